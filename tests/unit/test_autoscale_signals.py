"""Reading the autoscaler's signals from real exposition text: a gateway's /metrics as
telerad serves it, a worker's NVML gauges, and DCGM exporter series (recorded from the
exporter's documented output; there is no GPU here, so it stands in for the hardware)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydicom.uid import generate_uid

from telerad.api.types import Priority
from telerad.operator import catalog
from telerad.operator.autoscale import signals
from telerad.runtime.gpu import Gpus
from telerad.runtime.worker.metrics import WorkerMetrics
from tests.unit.test_outbox import store
from tests.unit.test_runtime_store import Site


def dcgm(gpu: int, namespace: str, pod: str, percent: int) -> str:
    """One series as NVIDIA's dcgm-exporter writes it with Kubernetes pod labels."""
    labels = (
        f'gpu="{gpu}",UUID="GPU-{gpu:04d}",device="nvidia{gpu}",'
        f'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1",container="worker",'
        f'namespace="{namespace}",pod="{pod}"'
    )
    return f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {percent}\n"


DCGM_RECORDED = (
    "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n"
    "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
    + dcgm(0, "tenant-a", "ct-head-hyperdensity-worker-7d9f-abcde", 93)
    + dcgm(1, "tenant-a", "ct-head-hyperdensity-worker-7d9f-fghij", 41)
    + dcgm(2, "tenant-b", "someone-else-0", 100)
)


def gateway_text(tmp: Path, studies: int) -> str:
    """/metrics of a real gateway catalog holding `studies` queued stat CT head jobs."""
    site = Site(tmp)
    for _ in range(studies):
        store(site, generate_uid())
    assert site.flow.complete_due(time.time() + 3600) == studies
    site.metrics.watch(site.catalog, [], site.flow.models)
    return generate_latest(site.metrics.exposed).decode()


def test_queue_depth_sums_gateways_and_tells_unknown_from_empty(tmp_path: Path) -> None:
    # One scrape per gateway, as the direct source reads them.
    samples = signals.parse(gateway_text(tmp_path / "a", 2))
    samples += signals.parse(gateway_text(tmp_path / "b", 3))
    depth = signals.queue_depth(samples, "ct-head-hyperdensity")
    assert depth == {Priority.STAT: 5, Priority.URGENT: 0, Priority.ROUTINE: 0}
    assert signals.queue_depth(samples, "cxr-opacity") == dict.fromkeys(Priority, 0)
    assert signals.queue_depth(samples, "not-routed-anywhere") is None


def test_gpu_utilisation_from_dcgm_for_the_model_pods_only() -> None:
    samples = signals.parse(DCGM_RECORDED)
    pods = {"ct-head-hyperdensity-worker-7d9f-abcde", "ct-head-hyperdensity-worker-7d9f-fghij"}
    assert signals.gpu_utilization(samples, pods) == pytest.approx([0.93, 0.41])


def test_gpu_utilisation_from_a_worker_without_gpus_is_empty_not_an_error() -> None:
    worker = WorkerMetrics("ct-head-hyperdensity", "cpu", Gpus())
    text = generate_latest(worker.registry).decode()
    assert "telerad_gpu_available 0.0" in text
    assert signals.gpu_utilization(signals.parse(text)) == []


def test_text_that_is_not_an_exposition_is_an_error() -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        signals.parse("<html>502 Bad Gateway</html>")


def test_gateways_report_how_long_the_oldest_job_of_each_priority_has_waited(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    for _ in range(2):
        store(site, generate_uid())
    queued = time.time() + 3600
    assert site.flow.complete_due(queued) == 2
    site.metrics.watch(site.catalog, [], site.flow.models, clock=lambda: queued + 42)
    samples = signals.parse(generate_latest(site.metrics.exposed).decode())
    ages = {
        (s.labels["model"], s.labels["priority"]): s.value
        for s in samples
        if s.name == "telerad_queue_oldest_seconds"
    }
    assert ages[("ct-head-hyperdensity", "stat")] == pytest.approx(42, abs=1)
    assert ages[("ct-head-hyperdensity", "routine")] == 0
    assert ages[("cxr-opacity", "stat")] == 0


def test_a_gateway_says_whether_its_catalog_answers_and_hides_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    """`telerad_gateway_catalog_up` as the operator reads it for CatalogUnavailable: 1
    from a working catalog; 0 once its database is gone, and then no queue series at
    all, which the autoscaler reads as unknown rather than as an empty queue."""
    site = Site(tmp_path)
    store(site, generate_uid())
    site.metrics.watch(site.catalog, [site.hot], site.flow.models)
    samples = signals.parse(generate_latest(site.metrics.exposed).decode())
    assert catalog.catalog_up(samples) is True
    site.catalog.close()  # every read now fails, as with a database that went away
    samples = signals.parse(generate_latest(site.metrics.exposed).decode())
    assert catalog.catalog_up(samples) is False
    assert signals.queue_depth(samples, "ct-head-hyperdensity") is None
    from_catalog = {
        "telerad_queue_oldest_seconds",
        "telerad_gateway_jobs",
        "telerad_gateway_outbox",
    }
    assert not from_catalog & {s.name for s in samples}
    assert "telerad_gateway_free_bytes" in {s.name for s in samples}
