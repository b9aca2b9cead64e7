"""A day of a large hospital's studies through three ways of sizing the GPU workers.

Arrivals: per hour at the peak, 120 X-ray, 50 ultrasound, 30 CT and 25 MR studies
(Poisson, seeded), scaled by an hour-of-day profile with a night trough. Each modality
has its own AIModel, as telerad deploys them, and so its own workers. A study is one job;
its GPU time depends on the modality (X-ray 4 s, ultrasound 6 s, CT 40 s, MR 60 s, each
+-25 %). Priorities: 30 % of CTs and 5 % of MRs are stat, 15 % of X-rays and 10 % of
ultrasounds urgent, the rest routine. A worker takes the most urgent job first (oldest
among equals), one at a time. A new worker is ready `cold_start` seconds after it is asked
for (pod start and model load). On scale-down, Kubernetes removes starting workers first,
then idle ones, then busy ones, which finish their job first (graceful termination).

The fleets, per model:

- telerad: `decide` every 10 s on what the gateway and workers report (queue by priority,
  jobs in flight, GPU busy share): min 0, max 8, 5 jobs per replica, 80 % GPU target.
  The models that receive stat studies (CT, MR) keep one idle worker warm all day
  (`keepWarmForUrgent` without windows: an emergency department never closes) with the
  default 300 s stabilisation. The others scale to zero after a window as long as a cold
  start: idling longer than it takes to start again costs more than it can save (the
  break-even rule of keeping versus restarting);
- fixed, sized for the peak: per model, the workers the peak hour's GPU load needs at the
  same 80 % target, plus one idle for its stat or urgent studies, all day;
- KEDA-like: a ScaledObject's defaults: the queue polled every 30 s, ceil(queue / 5)
  replicas, the HPA's 300 s scale-down stabilisation and a 300 s cooldown before zero;
  no urgency, in-flight or GPU awareness.

GPU-hours count every worker from the moment it is asked for (starting ones too).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from telerad.api.aimodel import KeepWarm, Scaling
from telerad.api.types import Priority
from telerad.operator.autoscale.decision import Memory, Observation, decide

PEAK_PER_HOUR = {"XR": 120, "US": 50, "CT": 30, "MR": 25}
GPU_SECONDS = {"XR": 4.0, "US": 6.0, "CT": 40.0, "MR": 60.0}
SHARES = {  # (stat, urgent) per modality; the rest is routine
    "XR": (0.0, 0.15),
    "US": (0.0, 0.10),
    "CT": (0.30, 0.0),
    "MR": (0.05, 0.0),
}
# Share of the peak hour's arrivals in each hour of the day (0:00 to 23:00).
PROFILE = (
    0.15, 0.10, 0.10, 0.10, 0.15, 0.25, 0.45, 0.70, 0.90, 1.00, 1.00, 1.00,
    0.95, 0.95, 1.00, 0.95, 0.85, 0.70, 0.55, 0.45, 0.35, 0.30, 0.25, 0.20,
)  # fmt: skip
INTERVAL = 10.0  # the operator's default autoscaler interval
# Seconds from asking for a worker to its first claim, on a GPU node that has the image:
# `telerad worker` is ready in about 2 s (measured, CPU), plus the pod's start and its
# first readiness probe (5 s period); a CUDA context and a larger model take longer.
COLD_START = 30.0
KEDA_POLL = 30.0
KEDA_COOLDOWN = 300.0
TELERAD = Scaling(
    min_replicas=0,
    max_replicas=8,
    target_queue_depth_per_replica=5,
    target_gpu_utilization=80,
    scale_down_stabilization_seconds=300,
)
KEEP_WARM = ("CT", "MR")  # the models stat studies go to
DAY_START = datetime(2026, 11, 30, tzinfo=UTC)


@dataclass(order=True)
class Job:
    rank: int
    arrived: float
    service: float = field(compare=False)
    priority: Priority = field(compare=False)


def arrivals(seed: int, hours: int = 24) -> dict[str, list[Job]]:
    """Each modality's jobs of the day, in order of arrival."""
    rng = np.random.default_rng(seed)
    jobs: dict[str, list[Job]] = {m: [] for m in PEAK_PER_HOUR}
    for hour in range(hours):
        for modality, peak in PEAK_PER_HOUR.items():
            stat, urgent = SHARES[modality]
            for at in sorted(rng.uniform(0, 3600, size=rng.poisson(peak * PROFILE[hour % 24]))):
                draw = rng.uniform()
                priority = (
                    Priority.STAT
                    if draw < stat
                    else Priority.URGENT
                    if draw < stat + urgent
                    else Priority.ROUTINE
                )
                service = GPU_SECONDS[modality] * rng.uniform(0.75, 1.25)
                jobs[modality].append(
                    Job(priority.rank, hour * 3600 + float(at), service, priority)
                )
    return jobs


@dataclass
class Worker:
    asked: float
    ready: float
    busy_until: float = 0.0
    busy: float = 0.0  # seconds busy so far
    seen: float = 0.0  # `busy` at the last utilisation read


@dataclass
class Fleet:
    """One model's workers."""

    cold_start: float
    workers: list[Worker] = field(default_factory=list)
    gpu_seconds: float = 0.0

    def running(self, now: float) -> int:
        return sum(w.busy_until > now for w in self.workers)

    def resize(self, now: float, replicas: int) -> None:
        while len(self.workers) < replicas:
            self.workers.append(Worker(asked=now, ready=now + self.cold_start, busy_until=now))
        while len(self.workers) > replicas:
            # Starting first, then idle, then the one closest to done.
            gone = min(self.workers, key=lambda w: (w.ready <= now, w.busy_until))
            self.gpu_seconds += max(gone.busy_until, now) - gone.asked
            self.workers.remove(gone)

    def utilisation(self, interval: float) -> list[float]:
        """Each ready worker's busy share since the last read, as a GPU gauge averages it."""
        shares = []
        for w in self.workers:
            shares.append(min(1.0, (w.busy - w.seen) / interval))
            w.seen = w.busy
        return shares


Scaler = Callable[[float, list[Job], Fleet], int]


@dataclass
class Outcome:
    gpu_hours: float
    waits: dict[Priority, list[float]]


def simulate(jobs: list[Job], scaler: Scaler, interval: float, cold_start: float) -> Outcome:
    """One model's day; `scaler(now, waiting, fleet) -> replicas` runs every `interval`."""
    fleet = Fleet(cold_start)
    waiting: list[Job] = []
    waits: dict[Priority, list[float]] = {p: [] for p in Priority}
    pending: Iterator[Job] = iter(jobs)
    upcoming = next(pending, None)
    end = 24 * 3600.0
    now, next_decision = 0.0, 0.0
    while now < end or waiting or upcoming is not None:
        while upcoming is not None and upcoming.arrived <= now:
            heapq.heappush(waiting, upcoming)
            upcoming = next(pending, None)
        if now >= next_decision:
            fleet.resize(now, scaler(now, waiting, fleet))
            next_decision = now + interval
        for w in fleet.workers:
            if not waiting:
                break
            if w.ready <= now and w.busy_until <= now:
                job = heapq.heappop(waiting)
                waits[job.priority].append(now - job.arrived)
                w.busy_until = now + job.service
        for w in fleet.workers:
            if w.busy_until > now:
                w.busy += 1.0
        now += 1.0
    fleet.resize(now, 0)
    return Outcome(fleet.gpu_seconds / 3600, waits)


def _queue(waiting: list[Job]) -> dict[Priority, int]:
    counts = dict.fromkeys(Priority, 0)
    for job in waiting:
        counts[job.priority] += 1
    return counts


def telerad_scaling(modality: str, window: int, cold_start: float) -> Scaling:
    """The scaling an operator would give each model (see the module docstring)."""
    if modality in KEEP_WARM:
        update = {"keep_warm_for_urgent": KeepWarm(), "scale_down_stabilization_seconds": window}
    else:
        update = {"scale_down_stabilization_seconds": math.ceil(cold_start)}
    return TELERAD.model_copy(update=update)


def telerad_scaler(scaling: Scaling) -> Scaler:
    memory = Memory()

    def scale(now: float, waiting: list[Job], fleet: Fleet) -> int:
        nonlocal memory
        seen = Observation(
            queue=_queue(waiting),
            gpu_utilization=fleet.utilisation(INTERVAL),
            replicas=len(fleet.workers),
            running=fleet.running(now),
        )
        decision = decide(scaling, seen, memory, DAY_START + timedelta(seconds=now))
        memory = decision.memory
        return decision.replicas

    return scale


def keda_scaler() -> Scaler:
    recent: list[tuple[float, int]] = []
    last_active = -math.inf

    def scale(now: float, waiting: list[Job], fleet: Fleet) -> int:
        nonlocal recent, last_active
        wanted = min(math.ceil(len(waiting) / TELERAD.target_queue_depth_per_replica), 8)
        if waiting:
            last_active = now
        recent = [(t, r) for t, r in recent if t > now - KEDA_COOLDOWN] + [(now, wanted)]
        current = len(fleet.workers)
        if wanted >= current:
            return wanted
        held = max(r for _, r in recent)
        if held == 0 and now - last_active < KEDA_COOLDOWN:
            return max(current, 1) if current else 0
        return held

    return scale


def peak_fleet(modality: str) -> int:
    """Workers for the peak hour's GPU load at the 80 % target, plus one idle for urgent."""
    load = PEAK_PER_HOUR[modality] * GPU_SECONDS[modality] / 3600
    return max(1, math.ceil(load / (TELERAD.target_gpu_utilization / 100))) + 1


@dataclass
class Result:
    name: str
    gpu_hours: float
    waits: dict[Priority, list[float]]

    def p95(self, priority: Priority) -> float:
        values = sorted(self.waits[priority])
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)] if values else 0.0


def _combined(name: str, outcomes: list[Outcome]) -> Result:
    waits: dict[Priority, list[float]] = {p: [] for p in Priority}
    for outcome in outcomes:
        for priority, values in outcome.waits.items():
            waits[priority] += values
    return Result(name, sum(o.gpu_hours for o in outcomes), waits)


def run(seed: int = 1, cold_start: float = COLD_START, window: int = 300) -> list[Result]:
    """telerad, fixed and KEDA-like over the same day, every model's figures summed."""
    day = arrivals(seed)
    fixed = {m: peak_fleet(m) for m in day}
    per_fleet: dict[str, list[Outcome]] = {"telerad": [], "fixed": [], "keda": []}
    for modality, jobs in day.items():
        scaler = telerad_scaler(telerad_scaling(modality, window, cold_start))
        per_fleet["telerad"].append(simulate(jobs, scaler, INTERVAL, cold_start))
        size = fixed[modality]
        per_fleet["fixed"].append(simulate(jobs, lambda *_, n=size: n, 3600, cold_start))
        per_fleet["keda"].append(simulate(jobs, keda_scaler(), KEDA_POLL, cold_start))
    return [
        _combined("telerad", per_fleet["telerad"]),
        _combined(f"fixed ({sum(fixed.values())} workers: {fixed})", per_fleet["fixed"]),
        _combined("KEDA-like (30 s poll, 300 s cooldown)", per_fleet["keda"]),
    ]


def table(results: list[Result]) -> list[str]:
    lines = [
        "| fleet | GPU-hours | p95 wait stat | p95 wait urgent | p95 wait routine |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        waits = " | ".join(
            f"{r.p95(p):.0f} s" for p in (Priority.STAT, Priority.URGENT, Priority.ROUTINE)
        )
        lines.append(f"| {r.name} | {r.gpu_hours:.1f} | {waits} |")
    return lines


def summary(results: list[Result]) -> str:
    """The line a script checks: telerad against the fixed fleet."""
    telerad, fixed = results[0], results[1]
    saved = 100 * (1 - telerad.gpu_hours / fixed.gpu_hours)
    return (
        f"saved_gpu_hours_pct={saved:.1f} p95_stat_wait_s={telerad.p95(Priority.STAT):.1f} "
        f"fixed_p95_stat_wait_s={fixed.p95(Priority.STAT):.1f}"
    )
