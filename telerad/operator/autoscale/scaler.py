"""One autoscaling step for one AIModel: find its gateways and workers, read the queue and
GPU utilisation, decide (decision.py), set the Deployment's scale, and report.

The reconciler calls `tick` under the model's lock, so the scaler and the reconciler never
write the model's status at the same time. The scaler owns the scaling fields of status,
the `Autoscaling` condition and the `MetricsUnavailable` reason of `Degraded`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from telerad.api import conditions as cond
from telerad.api import names
from telerad.api.aimodel import AIModel
from telerad.api.site import ImagingSite
from telerad.api.types import Condition, ConditionStatus
from telerad.operator.autoscale.decision import Decision, Memory, Observation, decide
from telerad.operator.autoscale.sources import Reading, Source, Target, Targets
from telerad.operator.events import Reason
from telerad.operator.k8s import Forbidden, Kube, KubeError
from telerad.operator.metrics import DECISIONS, DESIRED_REPLICAS, SCALER_ERRORS

log = logging.getLogger(__name__)
Body = dict[str, Any]
FIXED = "fixed by spec.replicas"
ACTIVE_MESSAGE = "the operator sets the workers from queue depth and GPU utilisation"


def ready(pod: Body) -> bool:
    status = pod.get("status") or {}
    return (
        not pod["metadata"].get("deletionTimestamp")
        and status.get("phase") == "Running"
        and bool(status.get("podIP"))
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
    )


def _port(pod: Body, name: str) -> int | None:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == name:
                return int(port["containerPort"])
    return None


def target(pod: Body, port_name: str, ca: bytes | None = None, server: str | None = None) -> Target:
    """The /metrics endpoint of a pod, at its own address (HTTPS with `ca`)."""
    port = _port(pod, port_name)
    scheme = "https" if ca is not None else "http"
    host = pod["status"]["podIP"]
    host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{host}:{port}/metrics"
    return Target(pod=pod["metadata"]["name"], url=url, ca=ca, server_name=server)


def aside(body: Body, model: AIModel, autoscalers: Sequence[Body]) -> tuple[str, str] | None:
    """(reason, message) when someone else sets the replicas; None when the scaler may."""
    annotations = body["metadata"].get("annotations") or {}
    if annotations.get(names.PAUSED_ANNOTATION, "").lower() in ("true", "1", "yes"):
        return "Paused", f"{names.PAUSED_ANNOTATION} is set"
    if model.spec.replicas is not None:
        return "FixedReplicas", f"{FIXED} (kubectl scale or an autoscaler of the AIModel)"
    name = body["metadata"]["name"]
    mine = {("Deployment", names.model_child(name)), ("AIModel", name)}
    for other in autoscalers:
        ref = other.get("spec", {}).get("scaleTargetRef") or {}
        if (ref.get("kind", "Deployment"), ref.get("name")) in mine:
            kind, other_name = other["kind"], other["metadata"]["name"]
            return "ExternalAutoscaler", f"{kind} {other_name} scales {ref.get('name')}"
    return None


def _outcome(decision: Decision, current: int) -> str:
    if decision.degraded:
        return "hold"
    if decision.replicas == current:
        return "steady"
    return "up" if decision.replicas > current else "down"


@dataclass
class Report:
    """What a tick concluded, before it is written: status fields, conditions, events."""

    fields: dict[str, Any]
    conditions: list[Condition]
    events: list[tuple[str, Reason, str]]


def report(
    body: Body,
    decision: Decision | None,
    reading: Reading | None,
    current: int,
    stood_aside: tuple[str, str] | None,
    *,
    now: datetime.datetime,
) -> Report:
    """Status and events of one tick, from what was there before (pure)."""
    gen = body["metadata"]["generation"]
    before = [Condition.from_wire(c) for c in (body.get("status") or {}).get("conditions", [])]
    events: list[tuple[str, Reason, str]] = []
    was_active = cond.find(before, cond.AUTOSCALING)
    if stood_aside is not None:
        reason, message = stood_aside
        after = cond.set_condition(before, cond.AUTOSCALING, False, reason, message, generation=gen)
        if was_active is None or was_active.reason != reason:
            events.append(("Normal", Reason.AUTOSCALER_ASIDE, message))
    else:
        after = cond.set_condition(
            before, cond.AUTOSCALING, True, "Active", ACTIVE_MESSAGE, generation=gen
        )
        if was_active is not None and was_active.status is ConditionStatus.FALSE:
            events.append(("Normal", Reason.AUTOSCALER_ACTIVE, ACTIVE_MESSAGE))
    degraded = cond.find(before, cond.DEGRADED)
    held = degraded is not None and degraded.reason == cond.METRICS_UNAVAILABLE
    fields: dict[str, Any] = {}
    if decision is not None and reading is not None:
        if decision.degraded:
            problems = "; ".join(reading.problems) or decision.degraded
            message = f"{decision.degraded}: {problems}"[:1024]
            after = cond.set_condition(
                after, cond.DEGRADED, True, cond.METRICS_UNAVAILABLE, message, generation=gen
            )
            if not held:
                events.append(("Warning", Reason.METRICS_UNAVAILABLE, message))
        elif held:
            after = cond.set_condition(after, cond.DEGRADED, False, "AsExpected", generation=gen)
            events.append(("Normal", Reason.METRICS_RESTORED, "queue and GPU metrics read again"))
        fields = {"desiredReplicas": decision.replicas, "scalingReason": decision.reason[:1024]}
        if reading.queue is not None:
            fields["queueDepth"] = sum(reading.queue.values())
        if reading.gpu_utilization is not None:
            gpus = reading.gpu_utilization
            fields["gpuUtilization"] = round(100 * sum(gpus) / len(gpus)) if gpus else 0
        if decision.replicas != current:
            fields["lastScaleTime"] = now.replace(microsecond=0).isoformat()
            events.append(
                (
                    "Normal",
                    Reason.SCALED,
                    f"workers {current} -> {decision.replicas}: {decision.reason}",
                )
            )
    elif held:  # standing aside: the scaler's metrics no longer matter
        after = cond.set_condition(after, cond.DEGRADED, False, "AsExpected", generation=gen)
    return Report(fields=fields, conditions=after, events=events)


class Autoscaler:
    def __init__(self, kube: Kube, source: Source) -> None:
        self.kube = kube
        self.source = source
        self._memory: dict[tuple[str, str], Memory] = {}

    async def _targets(
        self, namespace: str, name: str, sites: Mapping[str, ImagingSite]
    ) -> tuple[Targets, list[str]]:
        gateways, missing = [], []
        for site_name, site in sorted(sites.items()):
            pods = [
                p
                for p in await self.kube.pods(
                    namespace, names.selector_labels(site_name, "gateway")
                )
                if ready(p)
            ]
            if not pods:
                missing.append(f"gateway of site {site_name} has no ready pod")
            ca = server = None
            if site.spec.tls is not None:
                secret = site.spec.tls.secret_name
                try:
                    ca = await self.kube.secret_key(namespace, secret, "ca.crt")
                except Forbidden:
                    # Without its CA the gateway's HTTPS cannot be checked: not read at all.
                    missing.append(f"site {site_name}: the operator may not read {secret!r}")
                    continue
                server = f"{names.site_child(site_name, 'gateway')}.{namespace}.svc"
            gateways += [target(p, "http", ca, server) for p in pods]
        workers = [
            target(p, "metrics")
            for p in await self.kube.pods(namespace, names.selector_labels(name, "worker"))
            if ready(p)
        ]
        return Targets(namespace, name, gateways, workers), missing

    async def tick(
        self,
        body: Body,
        model: AIModel,
        deployment: Body | None,
        sites: Mapping[str, ImagingSite],
        now: datetime.datetime | None = None,
    ) -> None:
        now = now or datetime.datetime.now(datetime.UTC)
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        key = (namespace, name)
        if deployment is None:
            return  # the reconciler has not created the workers yet
        current = int(deployment["spec"].get("replicas", 1))
        decision = reading = None
        try:
            stood_aside = aside(body, model, await self.kube.autoscalers(namespace))
            if stood_aside is None:
                targets, missing = await self._targets(namespace, name, sites)
                reading = await self.source.read(targets)
                if missing:
                    problems = missing + reading.problems
                    reading = Reading(None, reading.gpu_utilization, problems)
        except KubeError as err:
            SCALER_ERRORS.labels(namespace, name, "discover").inc()
            log.warning("autoscaler of %s/%s could not list its pods: %s", namespace, name, err)
            return
        if stood_aside is not None:
            # Its history no longer describes what happened: start afresh when back.
            self._memory.pop(key, None)
            DECISIONS.labels(namespace, name, "aside").inc()
        elif reading is not None:
            memory = self._memory.get(key, Memory())
            seen = Observation(reading.queue, reading.gpu_utilization, current, reading.running)
            decision = decide(model.spec.scaling, seen, memory, now)
            self._memory[key] = decision.memory
            DECISIONS.labels(namespace, name, _outcome(decision, current)).inc()
            DESIRED_REPLICAS.labels(namespace, name).set(decision.replicas)
            if decision.degraded:
                SCALER_ERRORS.labels(namespace, name, "metrics").inc()
            if decision.replicas != current:
                try:
                    await self.kube.scale(namespace, names.model_child(name), decision.replicas)
                except KubeError as err:
                    SCALER_ERRORS.labels(namespace, name, "scale").inc()
                    log.warning("autoscaler of %s/%s could not scale: %s", namespace, name, err)
                    return
                log.info(
                    "scaled %s/%s workers %d -> %d: %s",
                    namespace, name, current, decision.replicas, decision.reason,
                )  # fmt: skip
        result = report(body, decision, reading, current, stood_aside, now=now)
        await self._write(body, result)

    async def _write(self, body: Body, result: Report) -> None:
        previous = body.get("status") or {}
        status = {**result.fields, "conditions": [c.to_wire() for c in result.conditions]}
        if any(previous.get(k) != v for k, v in status.items()):
            meta = body["metadata"]
            await self.kube.patch_status("AIModel", meta["namespace"], meta["name"], status)
        for type_, reason, message in result.events:
            await self.kube.post_event(body, type_, reason, message)

    def forget(self, namespace: str, name: str) -> None:
        self._memory.pop((namespace, name), None)

    async def close(self) -> None:
        await self.source.close()
