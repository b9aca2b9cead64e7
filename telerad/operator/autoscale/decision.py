"""How many workers a model should have: the autoscaler's decision, pure.

`decide` takes what was observed (queue depth by priority, the workers' GPU utilisation,
the current replicas) and what it remembers (its recent recommendations), and returns the
replicas, a one-line reason, and what to remember next time. The rules (DESIGN.md):

- desired = max(ceil(queue / targetQueueDepthPerReplica),
  ceil(current * gpuUtilisation / targetGPUUtilization)), clamped to [min, max], the GPU
  term counting only while jobs wait (a worker runs one job at a time, so a busy GPU with
  an empty queue needs no second one: a day's simulation showed that term alone keeping
  an extra worker up most of the time);
- up at once; down only to the highest recommendation of the last
  `scaleDownStabilizationSeconds` (so a dip does not remove a worker that the next minute
  needs, and input that flaps does not make replicas flap);
- to zero only when every recommendation in that window was zero (the queue has been
  empty that long) and `minReplicas` is 0;
- a stat or urgent job waiting with no worker: one at once; `keepWarmForUrgent` keeps one
  worker warm in its windows, that is idle and ready: one more than the jobs in flight, so
  a stat study never waits behind a routine one for a cold start;
- never fewer than the jobs in flight: scaling away a busy worker only throws its work
  away (its lease expires and the job runs again);
- metrics missing or stale: hold (never down, never to zero) and say Degraded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from telerad.api.aimodel import KeepWarm, Scaling
from telerad.api.types import Priority

URGENT = (Priority.STAT, Priority.URGENT)


@dataclass(frozen=True, slots=True)
class Observation:
    queue: Mapping[Priority, int] | None
    """Jobs waiting, by priority, summed over the gateways; None when unknown or stale."""
    gpu_utilization: Sequence[float] | None
    """Per running worker, 0-1; None when unknown or stale (an empty list: no workers)."""
    replicas: int
    """Workers the Deployment has now."""
    running: int = 0
    """Jobs leased to workers now, summed over the gateways."""


@dataclass(frozen=True, slots=True)
class Memory:
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, replicas recommended before stabilisation), within the window."""


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str
    memory: Memory
    degraded: str | None = None
    """Why the scaler holds instead of deciding (missing or stale metrics)."""
    by: dict[str, int] = field(default_factory=dict)
    """The parts of the decision: queue, gpu, floor, ceiling."""


def in_windows(keep: KeepWarm, when: datetime) -> bool:
    """`when` (aware) falls in one of the daily windows, in their time zone."""
    if not keep.windows:
        return True
    try:
        local = when.astimezone(ZoneInfo(keep.time_zone)).time()
    except ZoneInfoNotFoundError:
        local = when.time()
    for window in keep.windows:
        start, end = _clock(window.start), _clock(window.end)
        inside = start <= local < end if start <= end else local >= start or local < end
        if inside:
            return True
    return False


def _clock(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def decide(scaling: Scaling, seen: Observation, memory: Memory, now: datetime) -> Decision:
    at = now.timestamp()
    window = scaling.scale_down_stabilization_seconds
    current = seen.replicas
    if seen.queue is None or seen.gpu_utilization is None:
        missing = "queue depth" if seen.queue is None else "GPU utilisation"
        # No new recommendation: holding is not a vote for the current count later on.
        return Decision(
            replicas=max(current, scaling.min_replicas),
            reason=f"holding at {current}: {missing} unknown or stale",
            memory=memory,
            degraded=f"{missing} is missing or stale; replicas held",
        )
    waiting = sum(seen.queue.values())
    urgent = sum(seen.queue.get(p, 0) for p in URGENT)
    by_queue = math.ceil(waiting / scaling.target_queue_depth_per_replica)
    utilisation = (
        sum(seen.gpu_utilization) / len(seen.gpu_utilization) if seen.gpu_utilization else 0.0
    )
    target = scaling.target_gpu_utilization / 100
    # Busy GPUs call for more workers only while jobs wait: a worker that runs one job at a
    # time is fully busy with an empty queue, and another would only sit beside it.
    by_gpu = math.ceil(current * utilisation / target - 1e-9) if current and waiting else 0
    wanted = max(by_queue, by_gpu)
    reasons = [f"queue {waiting} ({urgent} stat/urgent) -> {by_queue}"]
    if current:
        reasons.append(f"GPU {utilisation:.0%} of {scaling.target_gpu_utilization}% -> {by_gpu}")
    floor = scaling.min_replicas
    if floor > wanted:
        reasons.append(f"minReplicas {floor}")
    if seen.running > floor:
        floor = seen.running
        reasons.append(f"{seen.running} in flight: at least {seen.running}")
    if urgent and max(wanted, floor) == 0:
        floor = 1
        reasons.append("a stat or urgent job waits: at least 1")
    keep = scaling.keep_warm_for_urgent
    if keep is not None and in_windows(keep, now):
        floor = max(floor, seen.running + 1)
        reasons.append(f"keep-warm window: one idle, at least {seen.running + 1}")
    recommended = min(max(wanted, floor), scaling.max_replicas)
    kept = tuple((t, r) for t, r in memory.recommendations if t > at - window)
    kept = (*kept, (at, recommended))
    if not memory.recommendations:
        # No history (a new model, or the operator restarted): the current count stands
        # for the window just begun, so nothing is removed before it has passed.
        kept = ((at, current), *kept)
    # Up at once; down to the highest recommendation of the window (which includes this one).
    replicas = recommended if recommended >= current else max(r for _, r in kept)
    if replicas > recommended:
        reasons.append(f"scale-down waits {window} s (highest recent: {replicas})")
    elif recommended == scaling.max_replicas and wanted > recommended:
        reasons.append(f"capped at maxReplicas {scaling.max_replicas}")
    return Decision(
        replicas=replicas,
        reason="; ".join(reasons),
        memory=Memory(recommendations=kept),
        by={"queue": by_queue, "gpu": by_gpu, "floor": floor, "max": scaling.max_replicas},
    )
