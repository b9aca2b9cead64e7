"""The worker's Prometheus metrics (names from DESIGN.md): jobs by result, inference time,
the device it runs on, and the GPUs NVML sees. Labels carry the model, a fixed result or a
GPU index: never anything from a data set."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from telerad.runtime.gpu import Gpus

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)


class WorkerMetrics:
    def __init__(self, model: str, device: str, gpus: Gpus) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._jobs = Counter(
            "telerad_worker_jobs",
            "Jobs handled, by result (done, failed, parked, lost: the lease went to another).",
            ["model", "result"],
            registry=r,
        )
        self.inference = Histogram(
            "telerad_worker_inference_seconds",
            "Model time per study.",
            ["model"],
            buckets=_SECONDS,
            registry=r,
        ).labels(model)
        self._stage = Histogram(
            "telerad_worker_stage_seconds",
            "Time per step of a job: fetch, prepare, inference, report, store, complete.",
            ["model", "stage"],
            buckets=_SECONDS,
            registry=r,
        )
        r.register(_Devices(model, device, gpus))

    def job(self, result: str) -> None:
        self._jobs.labels(self.model, result).inc()

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.labels(self.model, stage).observe(seconds)


class _Devices(Collector):
    def __init__(self, model: str, device: str, gpus: Gpus) -> None:
        self._model, self._device, self._gpus = model, device, gpus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "telerad_worker_device",
            "Where the model runs (1 on the device in use: cpu or cuda).",
            labels=["model", "device"],
        )
        info.add_metric([self._model, self._device], 1)
        yield info
        available = GaugeMetricFamily(
            "telerad_gpu_available", "GPUs NVML reports on this machine (0: none, or no driver)."
        )
        available.add_metric([], self._gpus.count)
        yield available
        samples = self._gpus.sample()
        utilization = GaugeMetricFamily(
            "telerad_gpu_utilization_ratio",
            "Share of the last sample period each GPU was busy.",
            labels=["gpu"],
        )
        memory = GaugeMetricFamily(
            "telerad_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        for sample in samples:
            utilization.add_metric([str(sample.index)], sample.utilization)
            memory.add_metric([str(sample.index)], sample.memory_used)
        yield utilization
        yield memory
