"""What the autoscaler reads, from Prometheus text as gateways, workers and NVIDIA's DCGM
exporter expose it: a model's queue depth by priority, and its workers' GPU utilisation.

Both answers distinguish "none" from "unknown": a gateway that routes to the model
reports every priority, zeros included, so a missing series means the reading failed and
the scaler must hold, never scale to zero on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from telerad.api.types import Priority

QUEUE = "telerad_queue_depth"
NVML = "telerad_gpu_utilization_ratio"
DCGM = "DCGM_FI_DEV_GPU_UTIL"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition; ValueError when it is not one."""
    return [
        Sample(s.name, s.labels, float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def queue_depth(samples: Iterable[Sample], model: str) -> dict[Priority, int] | None:
    """Jobs waiting for `model`, by priority, summed over the gateways in `samples`; None
    when no gateway reported the model at all."""
    found: dict[Priority, int] = dict.fromkeys(Priority, 0)
    seen = False
    for s in samples:
        if s.name == QUEUE and s.labels.get("model") == model:
            seen = True
            priority = Priority(s.labels["priority"])
            found[priority] += int(s.value)
    return found if seen else None


def gpu_utilization(samples: Iterable[Sample], pods: set[str] | None = None) -> list[float]:
    """Utilisation (0-1) of each GPU: the workers' own NVML gauges, or DCGM's series for
    the worker pods named in `pods` (DCGM labels them with `pod`, its percent is 0-100)."""
    out = []
    for s in samples:
        if s.name == NVML:
            out.append(s.value)
        elif s.name == DCGM and (pods is None or s.labels.get("pod") in pods):
            out.append(s.value / 100)
    return out
