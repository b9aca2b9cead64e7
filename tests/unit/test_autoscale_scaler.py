"""The autoscaler's pure parts around the decision: when it stands aside, where it reads
a pod's metrics, and the status and events one step writes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from telerad.api.aimodel import AIModel
from telerad.api.types import Priority
from telerad.operator.autoscale.decision import Memory, Observation, decide
from telerad.operator.autoscale.scaler import aside, ready, report, target
from telerad.operator.autoscale.sources import Reading
from tests.unit.test_operator_builders import owner

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
QUEUE = {Priority.STAT: 1, Priority.URGENT: 0, Priority.ROUTINE: 6}


def model_body() -> dict[str, Any]:
    body = owner("ct-head-hyperdensity")
    body["metadata"] |= {"generation": 1, "namespace": "tenant-a"}
    return body


def scaler(kind: str, name: str, target_kind: str | None = "Deployment") -> dict[str, Any]:
    ref = {"name": name} | ({"kind": target_kind} if target_kind else {})
    return {"kind": kind, "metadata": {"name": "other"}, "spec": {"scaleTargetRef": ref}}


@pytest.mark.parametrize(
    ("change", "others", "reason"),
    [
        ({}, [], None),
        ({}, [scaler("HorizontalPodAutoscaler", "someone-else-worker")], None),
        (
            {},
            [scaler("HorizontalPodAutoscaler", "ct-head-hyperdensity-worker")],
            "ExternalAutoscaler",
        ),
        ({}, [scaler("ScaledObject", "ct-head-hyperdensity-worker", None)], "ExternalAutoscaler"),
        (
            {},
            [scaler("HorizontalPodAutoscaler", "ct-head-hyperdensity", "AIModel")],
            "ExternalAutoscaler",
        ),
        ({"annotations": {"telerad.io/paused": "true"}}, [], "Paused"),
        ({"replicas": 2}, [], "FixedReplicas"),
    ],
)
def test_stands_aside_for_people_and_other_autoscalers(
    change: dict[str, Any], others: list[dict[str, Any]], reason: str | None
) -> None:
    body = model_body()
    if "annotations" in change:
        body["metadata"]["annotations"] = change["annotations"]
    if "replicas" in change:
        body["spec"]["replicas"] = change["replicas"]
    found = aside(body, AIModel.from_wire(body), others)
    assert (found[0] if found else None) == reason
    if found and others:
        assert f"{others[0]['kind']} other" in found[1]


def pod(ip: str, *, ready_: bool = True, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "gw-0"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-28T12:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready_ else "False"}],
        },
    }


def test_only_ready_pods_are_read_at_their_own_address() -> None:
    assert ready(pod("10.0.0.5"))
    assert not ready(pod("10.0.0.5", ready_=False))
    assert not ready(pod("10.0.0.5", deleting=True))
    assert target(pod("10.0.0.5"), "http").url == "http://10.0.0.5:8080/metrics"
    tls = target(pod("fd00::5"), "http", b"PEM", "gw.tenant-a.svc")
    assert tls.url == "https://[fd00::5]:8080/metrics"
    assert tls.server_name == "gw.tenant-a.svc"


def step(body: dict[str, Any], reading: Reading, current: int, at: datetime) -> Any:
    seen = Observation(reading.queue, reading.gpu_utilization, current)
    decision = decide(AIModel.from_wire(body).spec.scaling, seen, Memory(), at)
    return report(body, decision, reading, current, None, now=at)


def written(body: dict[str, Any], result: Any) -> dict[str, Any]:
    after = copy.deepcopy(body)
    after["status"] = {**result.fields, "conditions": [c.to_wire() for c in result.conditions]}
    return after


def test_one_step_reports_scaling_and_degradation_once_each() -> None:
    body = model_body()
    up = step(body, Reading(QUEUE, [0.5]), current=1, at=T0)
    assert up.fields["queueDepth"] == 7
    assert up.fields["gpuUtilization"] == 50
    assert up.fields["desiredReplicas"] == 3  # ceil(7 / targetQueueDepthPerReplica 3)
    assert up.fields["lastScaleTime"] == "2026-11-28T12:00:00+00:00"
    assert [(t, r) for t, r, _ in up.events] == [("Normal", "Scaled")]
    assert up.events[0][2].startswith("workers 1 -> 3: queue 7 (1 stat/urgent)")
    body = written(body, up)

    blind = Reading(None, [0.5], ["gateway gw-0: connection refused"])
    held = step(body, blind, current=3, at=T0 + timedelta(seconds=10))
    degraded = next(c for c in held.conditions if c.type == "Degraded")
    assert (degraded.status.value, degraded.reason) == ("True", "MetricsUnavailable")
    assert "gw-0: connection refused" in degraded.message
    assert [r for _, r, _ in held.events] == ["MetricsUnavailable"]
    assert "lastScaleTime" not in held.fields and "queueDepth" not in held.fields
    body = written(body, held)
    again = step(body, blind, current=3, at=T0 + timedelta(seconds=20))
    assert again.events == []  # still blind: said once

    back = step(body, Reading(QUEUE, [0.5]), current=3, at=T0 + timedelta(seconds=30))
    assert [r for _, r, _ in back.events] == ["MetricsRestored"]
    assert next(c for c in back.conditions if c.type == "Degraded").status.value == "False"


def test_standing_aside_clears_the_scalers_degraded_and_says_so_once() -> None:
    body = model_body()
    body = written(body, step(body, Reading(None, None, ["prometheus down"]), 1, T0))
    result = report(body, None, None, 1, ("Paused", "telerad.io/paused is set"), now=T0)
    assert [r for _, r, _ in result.events] == ["AutoscalerStoodAside"]
    by_type = {c.type: c for c in result.conditions}
    assert by_type["Autoscaling"].reason == "Paused"
    assert by_type["Degraded"].status.value == "False"
    body = written(body, result)
    assert report(body, None, None, 1, ("Paused", "set"), now=T0).events == []
