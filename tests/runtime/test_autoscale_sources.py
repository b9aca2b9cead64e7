"""The autoscaler's two metric sources read the same things and lead to the same decisions:
straight from the pods (direct) and from a real Prometheus (Debian's package) scraping the
same endpoints with the `namespace` and `pod` labels a PodMonitor gives.

There is no GPU here. The workers' GPU series come from endpoints serving recorded values,
a stand-in for the hardware: one worker with its own NVML gauges, one whose utilisation
only NVIDIA's DCGM exporter reports (scraped the way that renames its `pod` label to
`exported_pod`, the case hand-written PromQL gets wrong).
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from telerad import synthetic
from telerad.api.aimodel import Scaling
from telerad.api.config import Completion
from telerad.api.types import Priority
from telerad.devcluster.pki import CertificateAuthority
from telerad.operator.autoscale.decision import Decision, Memory, Observation, decide
from telerad.operator.autoscale.sources import Direct, Prometheus, Reading, Target, Targets
from tests.runtime.conftest import GatewayFactory, free_port, serve_metrics, storescu, tail

NS = "tenant-a"
MODEL = "ct-head-hyperdensity"
WORKER_NVML = "ct-head-hyperdensity-worker-5c9-abcde"
WORKER_DCGM = "ct-head-hyperdensity-worker-5c9-fghij"
RECORDED_NVML = (  # a worker's own gauges, as telerad/runtime/gpu.py writes them
    "# TYPE telerad_gpu_available gauge\ntelerad_gpu_available 1.0\n"
    "# TYPE telerad_gpu_utilization_ratio gauge\n"
    'telerad_gpu_utilization_ratio{gpu="0"} 0.93\n'
)
RECORDED_NO_NVML = "# TYPE telerad_gpu_available gauge\ntelerad_gpu_available 1.0\n"
RECORDED_DCGM = (  # dcgm-exporter's series with Kubernetes pod labels (recorded)
    "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n"
    "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
    'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-0000",device="nvidia0",'
    f'modelName="NVIDIA H100 80GB HBM3",container="worker",namespace="{NS}",'
    f'pod="{WORKER_DCGM}"}} 41\n'
    'DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-0001",device="nvidia1",'
    'modelName="NVIDIA H100 80GB HBM3",container="worker",namespace="tenant-b",'
    'pod="someone-else-0"} 100\n'
)
SCALING = Scaling(min_replicas=0, max_replicas=8, target_queue_depth_per_replica=1)


@pytest.fixture
def stand_ins() -> Iterator[dict[str, str]]:
    """host:port of each recorded endpoint, by role."""
    texts = {"nvml": RECORDED_NVML, "no-nvml": RECORDED_NO_NVML, "dcgm": RECORDED_DCGM}
    served = {role: serve_metrics(lambda t=text: t) for role, text in texts.items()}
    yield {role: f"127.0.0.1:{s.server_address[1]}" for role, s in served.items()}
    for server in served.values():
        server.shutdown()
        server.server_close()


def static(job: str, address: str, labels: dict[str, str], *, interval: str = "1s") -> object:
    return {
        "job_name": job,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "static_configs": [{"targets": [address], "labels": labels}],
    }


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus server's URL and config file; the test writes the config, then POSTs
    /-/reload."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs it from Debian")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}}))
    log = tmp_path / "prometheus.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"prometheus never became ready:\n{tail(log)}")
        time.sleep(0.2)
    try:
        yield url, config
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def read_both(targets: Targets, prometheus_url: str, dcgm: str) -> tuple[Reading, Reading]:
    async def read() -> tuple[Reading, Reading]:
        direct = Direct(timeout=3, dcgm_urls=[f"http://{dcgm}/metrics"])
        promql = Prometheus(prometheus_url, timeout=3)
        try:
            return await direct.read(targets), await promql.read(targets)
        finally:
            await direct.close()
            await promql.close()

    return asyncio.run(read())


def decided(reading: Reading) -> Decision:
    seen = Observation(reading.queue, reading.gpu_utilization, replicas=2)
    return decide(SCALING, seen, Memory(), datetime.datetime(2026, 11, 28, tzinfo=datetime.UTC))


def test_direct_and_prometheus_read_the_same_and_decide_the_same(
    start_gateway: GatewayFactory,
    stand_ins: dict[str, str],
    prometheus: tuple[str, Path],
    tmp_path: Path,
) -> None:
    url, config = prometheus
    gateway = start_gateway(completion=Completion(quiet_seconds=1))
    for seed in (31, 32, 33):
        series = synthetic.ct_series(n_slices=2, size=16, seed=seed)
        storescu(gateway, synthetic.write_series(series, tmp_path / str(seed)))
    gateway_address = f"127.0.0.1:{gateway.config.http_port}"
    scrape = [
        static("gateway", gateway_address, {"namespace": NS, "pod": "er-site-gateway-0"}),
        static("worker", stand_ins["nvml"], {"namespace": NS, "pod": WORKER_NVML}),
        static("worker-2", stand_ins["no-nvml"], {"namespace": NS, "pod": WORKER_DCGM}),
        # The exporter's own pod labels: its series' pod label becomes exported_pod.
        static("dcgm", stand_ins["dcgm"], {"namespace": "gpu-operator", "pod": "dcgm-x1"}),
    ]
    config.write_text(yaml.safe_dump({"scrape_configs": scrape}))
    assert httpx.post(f"{url}/-/reload", timeout=10).status_code == 200
    targets = Targets(
        namespace=NS,
        model=MODEL,
        gateways=[Target("er-site-gateway-0", f"http://{gateway_address}/metrics")],
        workers=[
            Target(WORKER_NVML, f"http://{stand_ins['nvml']}/metrics"),
            Target(WORKER_DCGM, f"http://{stand_ins['no-nvml']}/metrics"),
        ],
    )

    def settled() -> tuple[Reading, Reading] | None:
        direct, promql = read_both(targets, url, stand_ins["dcgm"])
        full = direct.queue is not None and sum(direct.queue.values()) == 3
        return (direct, promql) if full and promql == direct else None

    deadline = time.monotonic() + 60
    while (both := settled()) is None:
        assert time.monotonic() < deadline, read_both(targets, url, stand_ins["dcgm"])
        time.sleep(0.5)
    direct, promql = both
    assert direct.queue == {Priority.STAT: 3, Priority.URGENT: 0, Priority.ROUTINE: 0}
    assert direct.gpu_utilization == pytest.approx([0.93, 0.41])  # the other tenant's GPU: no
    assert decided(direct) == decided(promql)
    assert decided(direct).replicas == 3

    # The gateway goes away: neither source calls its queue empty; both hold.
    gateway.stop()
    deadline = time.monotonic() + 60
    while True:
        direct, promql = read_both(targets, url, stand_ins["dcgm"])
        if direct.queue is None and promql.queue is None:
            break
        assert time.monotonic() < deadline, (direct, promql)
        time.sleep(0.5)
    assert decided(direct).degraded and decided(promql).degraded
    assert decided(direct).replicas == decided(promql).replicas == 2
    assert any("gateway er-site-gateway-0" in p for p in direct.problems)


def test_an_unreachable_https_pod_is_named_the_same_at_every_read() -> None:
    """The problem text goes into the AIModel's status: it must say what failed and stay
    the same from one operator process to the next (aiohttp's own text names the TLS
    context by its memory address)."""
    ca = CertificateAuthority("telerad-test-ca")
    url = f"https://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    targets = Targets(NS, MODEL, gateways=[Target("g-0", url, ca.cert_pem, "g.svc")], workers=[])

    async def problems() -> list[str]:
        source = Direct(timeout=5)
        try:
            return (await source.read(targets)).problems
        finally:
            await source.close()

    first, second = asyncio.run(problems()), asyncio.run(problems())
    assert first == second
    assert len(first) == 1
    assert url in first[0]
    assert "cannot connect" in first[0]
    assert "object at 0x" not in first[0]
