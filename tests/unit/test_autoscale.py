"""The autoscaler's decision function: every rule of DESIGN.md, and flapping input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from telerad.api.aimodel import KeepWarm, Scaling, TimeWindow
from telerad.api.types import Priority
from telerad.operator.autoscale.decision import Decision, Memory, Observation, decide

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SCALING = Scaling(
    min_replicas=0,
    max_replicas=6,
    target_queue_depth_per_replica=5,
    target_gpu_utilization=80,
    scale_down_stabilization_seconds=300,
)


def seen(
    routine: int = 0, stat: int = 0, gpu: list[float] | None = None, replicas: int = 0
) -> Observation:
    return Observation(
        queue={Priority.ROUTINE: routine, Priority.STAT: stat, Priority.URGENT: 0},
        gpu_utilization=gpu if gpu is not None else [0.0] * replicas,  # idle workers
        replicas=replicas,
    )


def run(
    steps: list[Observation],
    scaling: Scaling = SCALING,
    every: float = 10,
    memory: Memory | None = None,
) -> list[Decision]:
    out = []
    memory = memory or Memory()
    for i, step in enumerate(steps):
        decision = decide(scaling, step, memory, T0 + timedelta(seconds=i * every))
        memory = decision.memory
        out.append(decision)
    return out


def test_queue_depth_sets_replicas_and_max_caps_them() -> None:
    assert decide(SCALING, seen(routine=12, replicas=1), Memory(), T0).replicas == 3
    capped = decide(SCALING, seen(routine=100, replicas=1), Memory(), T0)
    assert capped.replicas == 6 and "maxReplicas 6" in capped.reason


def test_gpu_utilisation_adds_workers_when_the_queue_does_not() -> None:
    busy = decide(SCALING, seen(routine=1, gpu=[0.95, 0.97], replicas=2), Memory(), T0)
    assert busy.replicas == 3 and busy.by == {"queue": 1, "gpu": 3, "floor": 0, "max": 6}


def test_up_at_once_down_only_after_the_window() -> None:
    steps = [seen(routine=20, replicas=1)] + [seen(replicas=4)] * 40
    replicas = [d.replicas for d in run(steps)]
    assert replicas[0] == 4  # up at once
    assert replicas[1:30] == [4] * 29  # the window is 300 s, one decision per 10 s
    assert replicas[31] == 0  # then down, to zero: the queue was empty for the window
    assert "scale-down waits" in run(steps)[5].reason


def test_min_replicas_is_a_floor_even_when_idle() -> None:
    scaling = SCALING.model_copy(update={"min_replicas": 2})
    assert [d.replicas for d in run([seen(replicas=2)] * 40, scaling)][-1] == 2


def test_an_urgent_job_at_zero_gets_a_worker_at_once() -> None:
    decision = decide(SCALING, seen(stat=1, replicas=0), Memory(), T0)
    assert decision.replicas == 1


def test_keep_warm_keeps_one_in_its_windows_only() -> None:
    warm = KeepWarm(windows=[TimeWindow(start="22:00", end="06:00")], time_zone="UTC")
    scaling = SCALING.model_copy(update={"keep_warm_for_urgent": warm})
    night = datetime(2026, 11, 28, 23, 30, tzinfo=UTC)
    assert decide(scaling, seen(), Memory(), night).replicas == 1
    assert "keep-warm" in decide(scaling, seen(), Memory(), night).reason
    early = datetime(2026, 11, 29, 5, 59, tzinfo=UTC)
    assert decide(scaling, seen(), Memory(), early).replicas == 1
    assert decide(scaling, seen(), Memory(), T0).replicas == 0
    always = SCALING.model_copy(update={"keep_warm_for_urgent": KeepWarm()})
    assert decide(always, seen(), Memory(), T0).replicas == 1


def test_missing_or_stale_metrics_hold_and_say_degraded() -> None:
    for blind in (
        Observation(queue=None, gpu_utilization=[0.1], replicas=3),
        Observation(queue={Priority.ROUTINE: 0}, gpu_utilization=None, replicas=3),
    ):
        held = decide(SCALING, blind, Memory(), T0)
        assert held.replicas == 3 and held.degraded is not None
        assert held.memory == Memory()
    # Never to zero on missing data, even from a count the window would allow to drop.
    history = run([seen(replicas=2)] * 40)
    blind = Observation(queue=None, gpu_utilization=None, replicas=2)
    assert decide(SCALING, blind, history[-1].memory, T0 + timedelta(hours=1)).replicas == 2


def test_a_restart_forgets_nothing_it_should_not() -> None:
    # No memory (the operator restarted): the current count holds for one window.
    decisions = run([seen(replicas=3)] * 40)
    assert [d.replicas for d in decisions[:30]] == [3] * 30
    assert decisions[-1].replicas == 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3), st.floats(0, 1)),
        min_size=1,
        max_size=80,
    ),
    st.integers(0, 600),
)
def test_flapping_input_never_flaps_replicas(
    inputs: list[tuple[int, int, float]], window: int
) -> None:
    scaling = SCALING.model_copy(update={"scale_down_stabilization_seconds": window})
    replicas = 0
    asked: list[tuple[float, int]] = []  # (time, workers the queue alone asked for)
    memory = Memory()
    for i, (routine, stat, gpu) in enumerate(inputs):
        now = (T0 + timedelta(seconds=10 * i)).timestamp()
        step = seen(routine=routine, stat=stat, gpu=[gpu] * replicas, replicas=replicas)
        decision = decide(scaling, step, memory, T0 + timedelta(seconds=10 * i))
        memory = decision.memory
        asked.append((now, min(-(-(routine + stat) // 5), scaling.max_replicas)))
        assert scaling.min_replicas <= decision.replicas <= scaling.max_replicas
        if stat:
            assert decision.replicas >= 1
        if decision.replicas < replicas:
            # Down only to what every queue seen in the window could be served by: a
            # queue that comes and goes keeps its workers until it has stayed away.
            recent = [n for t, n in asked if t > now - window]
            assert max(recent, default=0) <= decision.replicas
        replicas = decision.replicas


def test_busy_gpus_with_nothing_waiting_add_no_worker() -> None:
    idle_queue = decide(SCALING, seen(gpu=[1.0], replicas=1), Memory(), T0)
    assert idle_queue.replicas == 1 and idle_queue.by["gpu"] == 0


def test_busy_workers_are_never_scaled_away() -> None:
    busy = Observation(
        queue={Priority.ROUTINE: 0, Priority.STAT: 0, Priority.URGENT: 0},
        gpu_utilization=[1.0, 1.0, 0.0],
        replicas=3,
        running=2,
    )
    later = run([busy] * 40)  # far past the window: the idle one goes, the busy two stay
    assert later[-1].replicas == 2
    assert "2 in flight: at least 2" in later[-1].reason


def test_keep_warm_means_one_idle_worker_beside_the_busy_ones() -> None:
    scaling = SCALING.model_copy(update={"keep_warm_for_urgent": KeepWarm()})
    busy = Observation(
        queue={Priority.ROUTINE: 1, Priority.STAT: 0, Priority.URGENT: 0},
        gpu_utilization=[1.0],
        replicas=1,
        running=1,
    )
    (decision,) = run([busy], scaling)
    assert decision.replicas == 2
    assert "keep-warm window: one idle, at least 2" in decision.reason
