"""The autoscaler on the real control plane, with a real gateway.

The gateway is `telerad gateway` started from the very pod the operator's Deployment
created (its ConfigMap, its token Secret, its address: kwok gives pods loopback addresses,
and telerad.devcluster.standin does a kubelet's part), so the operator finds and scrapes
it as it would in a cluster. There are no GPUs here: each worker pod is stood in for by
an endpoint serving recorded NVML series (`GpuStandIn`), a stand-in for the hardware.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest

from telerad import synthetic
from telerad.devcluster import standin
from telerad.operator.autoscale import signals
from tests.cluster.conftest import Cluster, Operator
from tests.cluster.test_controlplane import eventually
from tests.runtime.conftest import TELERAD, env_nodelay, serve_metrics, tail, tool

MODEL = "ct-head"
WORKERS = f"{MODEL}-worker"
SITE = "er-site"
TARGET = 2  # targetQueueDepthPerReplica
WINDOW = 8  # scaleDownStabilizationSeconds

OBJECTS: list[dict[str, Any]] = [
    {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "ImagingSite",
        "metadata": {"name": SITE, "labels": {"telerad.io/region": "test"}},
        "spec": {
            "aeTitle": "TELERAD_ER",
            "allowedCallers": [
                {"aeTitle": "ER_CT01", "cidrs": ["127.0.0.0/8"]},
                {"aeTitle": "OP_CT02", "cidrs": ["127.0.0.0/8"]},
            ],
            "storage": {"hot": {"size": "1Gi", "days": 7}, "retentionDays": 7},
            "completion": {"quietSeconds": 1},
            "access": {"tokenSecretName": f"{SITE}-tokens"},
        },
    },
    {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "AIModel",
        "metadata": {"name": MODEL},
        "spec": {
            "image": "ghcr.io/telerad/worker:0.1.0",
            "model": {"name": "ct-head-hyperdensity", "version": "0.1.0"},
            "intendedUse": {"modalities": ["CT"]},
            "gpu": {"count": 1},
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 4,
                "targetQueueDepthPerReplica": TARGET,
                "targetGPUUtilization": 80,
                "scaleDownStabilizationSeconds": WINDOW,
            },
        },
    },
    {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "routing"},
        "spec": {
            "sites": {"names": [SITE]},
            "rules": [
                {
                    "name": "ed-ct",
                    "match": {"modalities": ["CT"], "callingAETitles": ["ER_CT01"]},
                    "models": [MODEL],
                    "priority": "stat",
                },
                {"name": "ct", "match": {"modalities": ["CT"]}, "models": [MODEL]},
            ],
        },
    },
]


def pods(cluster: Cluster, ns: str, component: str, instance: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/component={component},app.kubernetes.io/instance={instance}"
    with cluster.http() as http:
        found = http.get(f"/api/v1/namespaces/{ns}/pods", params={"labelSelector": selector})
    return [p for p in found.json()["items"] if standin_ready(p)]


def standin_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return (
        status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
    )


def current_gateway_pod(cluster: Cluster, ns: str) -> dict[str, Any] | None:
    """The gateway pod once its ConfigMap routes to the model (the policy is compiled in)
    and the pod runs that config."""
    config = cluster.kubectl(
        "-n", ns, "get", "configmap", f"{SITE}-gateway", "-o", "json", check=False
    )
    if (
        config.returncode != 0
        or f"name: {MODEL}" not in json.loads(config.stdout)["data"]["gateway.yaml"]
    ):
        return None
    found = cluster.kubectl(
        "-n", ns, "get", "deployment", f"{SITE}-gateway", "-o", "json", check=False
    )
    if found.returncode != 0:
        return None
    return standin.current_pod(pods(cluster, ns, "gateway", SITE), json.loads(found.stdout))


class GpuStandIn:
    """Stands in for the GPUs of the model's workers: for every worker pod, an endpoint at
    the pod's address serving the NVML series a worker exposes (recorded values)."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns
        self.utilization = 0.5
        self.servers: dict[str, ThreadingHTTPServer] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> GpuStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        for server in self.servers.values():
            server.shutdown()
            server.server_close()

    def exposition(self) -> str:
        return (
            "# TYPE telerad_gpu_available gauge\ntelerad_gpu_available 1\n"
            "# TYPE telerad_gpu_utilization_ratio gauge\n"
            f'telerad_gpu_utilization_ratio{{gpu="0"}} {self.utilization}\n'
        )

    def _follow(self) -> None:
        while not self._stop.wait(0.2):
            for pod in pods(self.cluster, self.ns, "worker", MODEL):
                ip = pod["status"]["podIP"]
                if ip not in self.servers:
                    self.servers[ip] = serve_metrics(self.exposition, ip, 9090)


@dataclass
class Gateway:
    url: str
    token: str
    proc: subprocess.Popen[bytes]


@pytest.fixture
def gateway(
    cluster: Cluster, operator: Operator, namespace: str, tmp_path: Path
) -> Iterator[Gateway]:
    """The objects applied and the site's gateway running in its pod's place."""
    token = f"{namespace}.{secrets.token_urlsafe(32)}"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{SITE}-tokens"},
        "data": {"worker": base64.b64encode(token.encode()).decode()},
    }
    for obj in [secret, *OBJECTS]:
        cluster.kubectl("-n", namespace, "apply", "--server-side", "-f", "-", input=json.dumps(obj))
    pod = eventually(lambda: current_gateway_pod(cluster, namespace), "the routed gateway's pod")

    def read(kind: str, name: str) -> dict[str, Any] | None:
        found = cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
        return json.loads(found.stdout) if found.returncode == 0 else None

    args = standin.prepare(pod, "gateway", read, tmp_path / "gateway")
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([str(TELERAD), *args], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{pod['status']['podIP']}:8080"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited:\n{tail(log)}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    eventually(healthy, "the stand-in gateway's /healthz")
    try:
        yield Gateway(url, token, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def send(url: str, caller: str, studies: range, tmp: Path) -> None:
    host = str(urlsplit(url).hostname)
    for seed in studies:
        directory = tmp / f"study-{seed}"
        files = synthetic.write_series(
            synthetic.ct_series(n_slices=2, size=16, seed=seed), directory
        )
        command = [tool("storescu"), "-aet", caller, "-aec", "TELERAD_ER", host, "11112"]
        done = subprocess.run(
            [*command, *map(str, files)],
            capture_output=True,
            text=True,
            env=env_nodelay(),
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def queued(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("telerad_queue_depth{") and f'model="{MODEL}"' in line
    )


def drain(url: str, token: str) -> int:
    """Claim and complete every job, as workers would; how many there were."""
    headers = {"Authorization": f"Bearer {token}"}
    done = 0
    while True:
        claim = {"model": MODEL, "owner": "test-worker", "leaseSeconds": 60}
        got = httpx.post(f"{url}/jobs/claim", json=claim, headers=headers, timeout=10)
        if got.status_code == 204:
            return done
        assert got.status_code == 200, got.text
        job = got.json()
        token = {"token": job["lease"]["token"]}
        answer = httpx.post(f"{url}/jobs/{job['id']}/complete", json=token, headers=headers)
        assert answer.status_code == 200, answer.text
        done += 1


def replicas(cluster: Cluster, ns: str) -> int:
    deployment = cluster.kubectl_json("-n", ns, "get", "deployment", WORKERS)
    return int(deployment["spec"].get("replicas", 1))


def scaled_to(
    cluster: Cluster, operator: Operator, ns: str, want: int, timeout: float = 60
) -> None:
    try:
        eventually(lambda: replicas(cluster, ns) == want, f"{want} workers", timeout)
    except AssertionError as err:
        status = json.dumps(model_status(cluster, ns), indent=1)
        raise AssertionError(f"{err}\nstatus: {status}\noperator:\n{operator.tail()}") from None


def model_status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return dict(cluster.kubectl_json("-n", ns, "get", "aimodel", MODEL).get("status") or {})


def condition(cluster: Cluster, ns: str, kind: str) -> dict[str, Any]:
    conditions = model_status(cluster, ns).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


def events(cluster: Cluster, ns: str, reason: str) -> list[tuple[float, str]]:
    """(time, message) of the model's events with `reason`, oldest first."""
    selector = f"involvedObject.name={MODEL},reason={reason}"
    found = cluster.kubectl_json("-n", ns, "get", "events", "--field-selector", selector)["items"]
    return sorted((_epoch(e["firstTimestamp"]), e["message"]) for e in found)


def test_queue_scales_workers_up_then_down_to_zero_and_urgent_brings_one(
    cluster: Cluster, operator: Operator, namespace: str, gateway: Gateway, tmp_path: Path
) -> None:
    site = gateway.url
    with GpuStandIn(cluster, namespace) as gpus:
        # Routine studies from the outpatient scanner: ceil(N / target) workers.
        send(site, "OP_CT02", range(100, 105), tmp_path)
        eventually(lambda: queued(site) == 5, "5 jobs queued")
        want = math.ceil(5 / TARGET)
        scaled_to(cluster, operator, namespace, want)
        status = model_status(cluster, namespace)
        assert status["queueDepth"] == 5
        assert status["desiredReplicas"] == want
        assert status["gpuUtilization"] == 50
        assert "queue 5 (0 stat/urgent) -> 3" in status["scalingReason"]
        assert condition(cluster, namespace, "Autoscaling")["status"] == "True"

        # More than the ceiling allows: bounded by maxReplicas.
        send(site, "OP_CT02", range(105, 111), tmp_path)
        eventually(lambda: queued(site) == 11, "11 jobs queued")
        scaled_to(cluster, operator, namespace, 4)

        # Four may already have been reached part-way through the sending; a decision that
        # sees all 11 says it is capped.
        def capped_at_11() -> bool:
            status = model_status(cluster, namespace)
            return (
                status["queueDepth"] == 11 and "capped at maxReplicas 4" in status["scalingReason"]
            )

        eventually(capped_at_11, "a decision on all 11 jobs, capped at maxReplicas")

        # Drained: down only after the window, then to zero (minReplicas 0).
        assert drain(site, gateway.token) == 11
        drained = time.time()
        scaled_to(cluster, operator, namespace, 0, timeout=WINDOW * 6)
        assert model_status(cluster, namespace)["queueDepth"] == 0
        downs = [
            (t, m) for t, m in events(cluster, namespace, "Scaled") if m.startswith("workers 4 ->")
        ]
        assert downs, events(cluster, namespace, "Scaled")
        # The last recommendation of 4 was at most one interval before the drain.
        assert downs[0][0] >= drained + WINDOW - 2.5, (downs, drained)
        assert events(cluster, namespace, "Scaled")[-1][1].startswith("workers ")
        assert " -> 0: " in events(cluster, namespace, "Scaled")[-1][1]
        assert len(gpus.servers) >= 4, "the GPU stand-in served every worker pod"

    # A stat study with no worker: one at once.
    send(site, "ER_CT01", range(200, 201), tmp_path)
    eventually(lambda: queued(site) == 1, "the stat job queued")
    scaled_to(cluster, operator, namespace, 1, timeout=15)
    assert "(1 stat/urgent)" in model_status(cluster, namespace)["scalingReason"]
    decisions = {
        sample.labels["reason"]: sample.value
        for sample in signals.parse(operator.metrics())
        if sample.name == "telerad_autoscaler_decisions_total"
        and sample.labels["namespace"] == namespace
    }
    assert decisions["up"] >= 3
    assert decisions["down"] >= 1


def _epoch(stamp: str) -> float:
    import datetime  # noqa: PLC0415

    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


KEDA_STAND_IN = {
    # KEDA's ScaledObject CRD reduced to what the operator reads (KEDA is not installed
    # here): a stand-in, so that the operator meets a ScaledObject as it would in a cluster.
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "scaledobjects.keda.sh"},
    "spec": {
        "group": "keda.sh",
        "scope": "Namespaced",
        "names": {"kind": "ScaledObject", "plural": "scaledobjects", "singular": "scaledobject"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("-n", ns, "apply", "--server-side", "-f", "-", input=json.dumps(obj))


def held_for(cluster: Cluster, ns: str, want: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert replicas(cluster, ns) == want
        time.sleep(0.5)


@pytest.mark.reliability("fault", "gateway gone while the autoscaler reads it")
def test_missing_metrics_hold_and_other_autoscalers_are_left_alone(
    cluster: Cluster, operator: Operator, namespace: str, gateway: Gateway
) -> None:
    with GpuStandIn(cluster, namespace):
        # The gateway dies before the scaler ever saw a full window of empty queue.
        gateway.proc.kill()
        gateway.proc.wait()
        eventually(
            lambda: "gateway" in condition(cluster, namespace, "Degraded").get("message", ""),
            "Degraded for want of the gateway's metrics",
        )
        assert condition(cluster, namespace, "Degraded")["reason"] == "MetricsUnavailable"
        assert events(cluster, namespace, "MetricsUnavailable")
        # minReplicas is 0 and the window long past: an empty queue would scale to zero,
        # an unknown one holds.
        held_for(cluster, namespace, 1, WINDOW + 4)
        assert "holding at 1" in model_status(cluster, namespace)["scalingReason"]

    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "cpu"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKERS},
            "minReplicas": 1,
            "maxReplicas": 3,
        },
    }
    apply(cluster, namespace, hpa)
    eventually(
        lambda: condition(cluster, namespace, "Autoscaling").get("reason") == "ExternalAutoscaler",
        "the scaler to stand aside for the HPA",
    )
    assert "HorizontalPodAutoscaler cpu" in condition(cluster, namespace, "Autoscaling")["message"]
    assert condition(cluster, namespace, "Degraded")["status"] == "False"
    # A person (or the HPA) sets the replicas; the operator does not fight them.
    cluster.kubectl("-n", namespace, "scale", "deployment", WORKERS, "--replicas=2")
    held_for(cluster, namespace, 2, 4)
    cluster.kubectl("-n", namespace, "delete", "hpa", "cpu")
    eventually(
        lambda: condition(cluster, namespace, "Autoscaling").get("status") == "True",
        "the scaler to take over again",
    )
    assert events(cluster, namespace, "AutoscalerActive")

    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(KEDA_STAND_IN))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=30s"
    )
    scaled_object = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "queue"},
        "spec": {"scaleTargetRef": {"name": WORKERS}, "triggers": []},
    }
    apply(cluster, namespace, scaled_object)
    eventually(
        lambda: "ScaledObject queue" in condition(cluster, namespace, "Autoscaling")["message"],
        "the scaler to stand aside for KEDA",
    )
    cluster.kubectl("-n", namespace, "delete", "scaledobject", "queue")

    cluster.kubectl("-n", namespace, "annotate", "aimodel", MODEL, "telerad.io/paused=true")
    eventually(
        lambda: condition(cluster, namespace, "Autoscaling").get("reason") == "Paused",
        "the scaler to stand aside while paused",
    )
    asides = [m for _, m in events(cluster, namespace, "AutoscalerStoodAside")]
    assert len(asides) == 3, asides
