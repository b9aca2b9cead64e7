"""What the autoscaler reads, from Prometheus text as gateways, workers and NVIDIA's DCGM
exporter expose it: a model's queue depth by priority, and its workers' GPU utilisation.

Both answers distinguish "none" from "unknown": a gateway that routes to the model
reports every priority, zeros included, so a missing series means the reading failed and
the scaler must hold, never scale to zero on it. Samples carry the pod they come from in
a `pod` label (Prometheus adds it when it scrapes; the direct source adds it), which is
how a gateway that did not answer is told from one with nothing queued.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from telerad.api.types import Priority

QUEUE = "telerad_queue_depth"
JOBS = "telerad_gateway_jobs"
NVML = "telerad_gpu_utilization_ratio"
DCGM = "DCGM_FI_DEV_GPU_UTIL"
POD = "pod"
# Scraped without honor_labels, the worker's pod label on a DCGM series is renamed to
# exported_pod, and `pod` then names the exporter itself: the first wins.
DCGM_POD_LABELS = ("exported_pod", POD)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str, pod: str | None = None) -> list[Sample]:
    """Samples of a Prometheus text exposition, labelled with the `pod` it was scraped
    from when given; ValueError when it is not one."""
    extra = {POD: pod} if pod is not None else {}
    return [
        Sample(s.name, {**s.labels, **extra}, float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def queue_depth(
    samples: Iterable[Sample], model: str, gateways: set[str] | None = None
) -> dict[Priority, int] | None:
    """Jobs waiting for `model`, by priority, summed over the gateways in `samples`; None
    when no gateway reported the model at all, or when one of the `gateways` pods given
    did not (its count is unknown, so the sum would be too low)."""
    found: dict[Priority, int] = dict.fromkeys(Priority, 0)
    reported: set[str] = set()
    seen = False
    for s in samples:
        if s.name == QUEUE and s.labels.get("model") == model:
            seen = True
            reported.add(s.labels.get(POD, ""))
            found[Priority(s.labels["priority"])] += int(s.value)
    if gateways is not None:
        return found if gateways <= reported else None
    return found if seen else None


def running(samples: Iterable[Sample], model: str) -> int:
    """Jobs of `model` leased to workers now, summed over the gateways in `samples`."""
    return sum(
        int(s.value)
        for s in samples
        if s.name == JOBS and s.labels.get("model") == model and s.labels.get("state") == "leased"
    )


def gpu_utilization(samples: Iterable[Sample], pods: set[str] | None = None) -> list[float]:
    """Utilisation (0-1) of each GPU of the worker `pods` (all when None): a pod's own
    NVML gauges where it has them, else DCGM's series naming it (in percent)."""
    nvml: dict[str, list[float]] = defaultdict(list)
    dcgm: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s.name == NVML:
            nvml[s.labels.get(POD, "")].append(s.value)
        elif s.name == DCGM:
            pod = next((s.labels[k] for k in DCGM_POD_LABELS if k in s.labels), "")
            dcgm[pod].append(s.value / 100)
    wanted = set(nvml) | set(dcgm) if pods is None else pods
    return [u for pod in sorted(wanted) for u in (nvml.get(pod) or dcgm.get(pod) or [])]
