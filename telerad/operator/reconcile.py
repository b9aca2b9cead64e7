"""One level-based, idempotent reconcile per kind.

Each reads the object, computes every child from its spec (builders), makes the cluster
hold them (k8s), and derives status from what it finds. Called from create, update and
resume, from the periodic resync and from events on children, it converges to the same
state whatever triggered it, and writes nothing when nothing differs.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import ValidationError

from telerad.api import certificates, names
from telerad.api import conditions as cond
from telerad.api.aimodel import AIModel
from telerad.api.base import ApiModel
from telerad.api.routing import RoutingPolicy
from telerad.api.site import ImagingSite
from telerad.api.types import Condition
from telerad.operator import catalog
from telerad.operator.autoscale.scaler import FIXED, Autoscaler
from telerad.operator.autoscale.scaler import ready as pod_ready
from telerad.operator.autoscale.scaler import target as metrics_target
from telerad.operator.autoscale.signals import Sample
from telerad.operator.autoscale.sources import Direct, ReadError
from telerad.operator.builders import model as model_builders
from telerad.operator.builders import routing
from telerad.operator.builders import site as site_builders
from telerad.operator.events import Reason
from telerad.operator.k8s import Forbidden, Kube, KubeError
from telerad.operator.metrics import RECONCILE_SECONDS, RECONCILES
from telerad.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
PAUSED = "Paused"
M = TypeVar("M", bound=ApiModel)
Body = dict[str, Any]


class Outcome(StrEnum):
    DONE = "done"
    INVALID = "invalid"
    PAUSED = "paused"
    GONE = "gone"


_parsed: dict[tuple[str, str], ApiModel | None] = {}


def _parse(model: type[M], body: Body) -> M | None:
    """Parse once per resourceVersion; an invalid object parses to None."""
    key = (body["metadata"].get("uid", ""), body["metadata"].get("resourceVersion", ""))
    if key not in _parsed:
        try:
            _parsed[key] = model.from_wire(body)
        except ValidationError:
            _parsed[key] = None
        if len(_parsed) > 50_000:
            _parsed.clear()
    found = _parsed[key]
    return found if isinstance(found, model) else None


@dataclass
class World:
    """The custom resources of one namespace, as the operator's watches last saw them."""

    namespace: str
    sites: dict[str, Body] = field(default_factory=dict)
    models: dict[str, Body] = field(default_factory=dict)
    policies: dict[str, Body] = field(default_factory=dict)
    children: dict[tuple[str, str], Body] = field(default_factory=dict)
    """(kind, name) -> the operator's children in the namespace, from the watch cache."""

    def parsed_models(self) -> dict[str, AIModel]:
        return {n: m for n, b in self.models.items() if (m := _parse(AIModel, b)) is not None}

    def parsed_policies(self) -> list[RoutingPolicy]:
        return [p for b in self.policies.values() if (p := _parse(RoutingPolicy, b)) is not None]

    def site_labels(self, name: str) -> dict[str, str]:
        return dict(self.sites.get(name, {}).get("metadata", {}).get("labels") or {})

    def rules_for(self, site: str) -> list[Any]:
        return routing.compile_rules(
            site, self.site_labels(site), self.parsed_policies(), self.parsed_models()
        )

    def models_of_site(self, site: str) -> set[str]:
        return {route.name for rule in self.rules_for(site) for route in rule.models}

    def gateways_of_model(self, model: str) -> dict[str, ImagingSite]:
        """Sites whose rules route to the model."""
        found = {}
        for name, body in self.sites.items():
            parsed = _parse(ImagingSite, body)
            if parsed is not None and model in self.models_of_site(name):
                found[name] = parsed
        return found

    def policies_using(self, model: str) -> list[str]:
        return [
            p.metadata.name
            for p in self.parsed_policies()
            if any(model in r.models for r in p.spec.rules)
        ]

    def policies_selecting(self, site: str) -> list[str]:
        """Policies that select the site, or did at their last reconcile."""
        labels = self.site_labels(site)
        return [
            p.metadata.name
            for p in self.parsed_policies()
            if routing.selects(p, site, labels)
            or site in (self.policies[p.metadata.name].get("status") or {}).get("sites", [])
        ]

    def models_of_policy(self, policy: str) -> set[str]:
        parsed = _parse(RoutingPolicy, self.policies[policy]) if policy in self.policies else None
        return {m for r in parsed.spec.rules for m in r.models} if parsed else set()

    def sites_of(self, policy: str) -> list[str]:
        """Sites the policy selects, and those it selected at its last reconcile."""
        body = self.policies.get(policy)
        parsed = _parse(RoutingPolicy, body) if body else None
        if body is None or parsed is None:
            return []
        previous = (body.get("status") or {}).get("sites", [])
        now = [s for s in self.sites if routing.selects(parsed, s, self.site_labels(s))]
        return sorted({*now, *(s for s in previous if s in self.sites)})


Snapshot = Callable[[], World]
"""Builds the namespace's World from the watch caches as they are now."""


def _conditions(status: Body) -> list[Condition]:
    return [Condition.from_wire(c) for c in status.get("conditions", [])]


def _available(deployment: Body | None) -> bool:
    conditions = (deployment or {}).get("status", {}).get("conditions") or []
    return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)


def _rolled_out(deployment: Body | None) -> bool:
    if deployment is None:
        return False
    status = deployment.get("status", {})
    want = deployment["spec"].get("replicas", 1)
    return bool(
        status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == want
        and status.get("replicas", 0) == want
    )


@dataclass(frozen=True)
class _SiteProblem:
    """Why a site is Degraded, and whether that alone keeps it from being Ready."""

    reason: Reason
    message: str
    blocks_ready: bool = True


def _error_summary(err: ValidationError) -> str:
    """Field paths and messages only: values can hold anything a user typed."""
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_input=False)]
    return "; ".join(parts)[:1024]


class Reconciler:
    def __init__(
        self, kube: Kube, settings: OperatorSettings, scaler: Autoscaler | None = None
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.scaler = scaler
        # The gateways' own /metrics, whatever source the autoscaler reads.
        self.gateways = Direct(settings.scrape_timeout_seconds)
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._again: set[tuple[str, str, str]] = set()

    async def close(self) -> None:
        if self.scaler is not None:
            await self.scaler.close()
        await self.gateways.close()

    # ------------------------------------------------------------------ entry points

    async def reconcile(self, kind: str, namespace: str, name: str, snapshot: Snapshot) -> Outcome:
        """Reconcile one object. A call that arrives while the same object is being
        reconciled makes that run go round once more, on a fresh snapshot, instead of
        waiting its turn."""
        key = (kind, namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            self._again.add(key)
            return Outcome.DONE
        fn: Callable[[World, str], Awaitable[Outcome]] = {
            "ImagingSite": self._site,
            "AIModel": self._model,
            "RoutingPolicy": self._policy,
        }[kind]
        async with lock:
            while True:
                self._again.discard(key)
                started = time.monotonic()
                result = "error"
                try:
                    outcome = await fn(snapshot(), name)
                    result = outcome.value
                finally:
                    RECONCILES.labels(kind, result).inc()
                    RECONCILE_SECONDS.labels(kind, result).observe(time.monotonic() - started)
                if key not in self._again:
                    if outcome is Outcome.GONE:
                        self._locks.pop(key, None)
                    return outcome

    async def reconcile_all(
        self, kind: str, namespace: str, names_: Iterable[str], snapshot: Snapshot
    ) -> None:
        """Reconcile dependents; a failure is logged and left to the periodic resync."""
        for name in sorted(set(names_)):
            try:
                await self.reconcile(kind, namespace, name, snapshot)
            except Exception:
                log.exception(
                    "reconcile of %s %s/%s failed; the resync retries", kind, namespace, name
                )

    # ------------------------------------------------------------------ shared steps

    async def _begin(
        self, kind: str, world: World, name: str
    ) -> tuple[Body | None, list[Condition], bool]:
        """Read the object; handle the pause annotation. Returns (body, conditions, paused)."""
        body = await self.kube.get(names.API_VERSION, kind, world.namespace, name)
        if body is None:
            return None, [], False
        conds = _conditions(body.get("status") or {})
        gen = body["metadata"]["generation"]
        annotations = body["metadata"].get("annotations") or {}
        if annotations.get(names.PAUSED_ANNOTATION, "").lower() in ("true", "1", "yes"):
            updated = cond.set_condition(
                conds,
                PAUSED,
                True,
                "Annotated",
                f"{names.PAUSED_ANNOTATION} is set",
                generation=gen,
            )
            await self._finish(body, conds, updated, {}, Reason.PAUSED)
            return body, updated, True
        if cond.find(conds, PAUSED) is not None and cond.is_true(conds, PAUSED):
            conds = cond.set_condition(conds, PAUSED, False, "Resumed", generation=gen)
            await self.kube.post_event(body, "Normal", Reason.RESUMED, "reconciliation resumed")
        return body, conds, False

    async def _load(
        self, model: type[M], world: World, name: str
    ) -> tuple[Body, list[Condition], M] | Outcome:
        """The object, its conditions and its parsed spec; or why there is nothing to do."""
        body, conds, paused = await self._begin(model.__name__, world, name)
        if body is None:
            return Outcome.GONE
        if paused:
            return Outcome.PAUSED
        try:
            return body, conds, model.from_wire(body)
        except ValidationError as err:
            return await self._invalid(body, conds, err)

    async def _invalid(self, body: Body, conds: list[Condition], err: ValidationError) -> Outcome:
        gen = body["metadata"]["generation"]
        message = _error_summary(err)
        updated = cond.set_condition(
            conds, cond.DEGRADED, True, "InvalidSpec", message, generation=gen
        )
        updated = cond.set_condition(
            updated, cond.READY, False, "InvalidSpec", "see Degraded", generation=gen
        )
        await self._finish(body, conds, updated, {}, Reason.INVALID_SPEC, warning=message)
        return Outcome.INVALID

    async def _finish(
        self,
        body: Body,
        before: list[Condition],
        after: list[Condition],
        fields: Body,
        reason: Reason | None = None,
        *,
        warning: str | None = None,
    ) -> None:
        """Write status if it differs, and post events for what changed."""
        current = body.get("status") or {}
        status = {
            **fields,
            "conditions": [c.to_wire() for c in after],
            "observedGeneration": body["metadata"]["generation"],
        }
        if any(current.get(k) != v for k, v in status.items()):
            await self.kube.patch_status(
                body["kind"], body["metadata"]["namespace"], body["metadata"]["name"], status
            )
        was_ready, is_ready = cond.is_true(before, cond.READY), cond.is_true(after, cond.READY)
        if warning is not None and current.get("conditions") != status["conditions"]:
            await self.kube.post_event(body, "Warning", reason or Reason.INVALID_SPEC, warning)
        elif reason is Reason.PAUSED and not cond.is_true(before, PAUSED):
            await self.kube.post_event(body, "Normal", reason, "reconciliation paused")
        if is_ready != was_ready and reason is not Reason.PAUSED:
            ready = cond.find(after, cond.READY)
            message = ready.message if ready else ""
            await self.kube.post_event(
                body,
                "Normal" if is_ready else "Warning",
                Reason.READY if is_ready else Reason.NOT_READY,
                message,
            )

    async def _apply(self, owner: Body, world: World, children: list[Body]) -> None:
        written = [
            f"{c['kind']}/{c['metadata']['name']}"
            for c in children
            if await self.kube.ensure(c, world.children.get((c["kind"], c["metadata"]["name"])))
        ]
        if written:
            await self.kube.post_event(
                owner, "Normal", Reason.APPLIED, "applied " + ", ".join(written)
            )

    # ------------------------------------------------------------------ kinds

    async def _site(self, world: World, name: str) -> Outcome:
        loaded = await self._load(ImagingSite, world, name)
        if isinstance(loaded, Outcome):
            return loaded
        body, conds, site = loaded
        ns, gen = world.namespace, body["metadata"]["generation"]
        await self._apply(
            body, world, site_builders.children(body, site, world.rules_for(name), self.settings)
        )

        problem = await self._tls_problem(ns, site.spec.tls.secret_name) if site.spec.tls else None
        if site.spec.catalog is not None and (problem is None or not problem.blocks_ready):
            problem = await self._catalog_problem(ns, name, site) or problem
        gateway = names.site_child(name, "gateway")
        deployment = world.children.get(("Deployment", gateway))
        available = _available(deployment)
        after = cond.set_condition(
            conds,
            cond.DEGRADED,
            problem is not None,
            problem.reason if problem else "AsExpected",
            problem.message if problem else "",
            generation=gen,
        )
        after = cond.set_condition(
            after,
            cond.PROGRESSING,
            not _rolled_out(deployment),
            "RollingOut" if not _rolled_out(deployment) else "RolledOut",
            f"gateway Deployment {gateway}",
            generation=gen,
        )
        blocked = problem is not None and problem.blocks_ready
        ready = available and not blocked
        after = cond.set_condition(
            after,
            cond.READY,
            ready,
            "GatewayAvailable" if ready else ("Degraded" if blocked else "GatewayUnavailable"),
            f"gateway Deployment {gateway} is {'available' if available else 'not available yet'}",
            generation=gen,
        )
        endpoint = f"{site.spec.ae_title}@{gateway}.{ns}.svc:{site.spec.port}"
        await self._finish(
            body,
            conds,
            after,
            {
                "endpoint": endpoint,
                "tiers": [t.to_wire() for t in site_builders.tier_status(site)],
                "gateways": site_builders.gateways(site),
            },
            problem.reason if problem else None,
            warning=problem.message if problem else None,
        )
        return Outcome.DONE

    async def _tls_problem(self, namespace: str, secret: str) -> _SiteProblem | None:
        """What is wrong with the site's TLS Secret, if anything: missing, not granted, no
        certificate in it, or a certificate that has expired or expires within 14 days."""
        try:
            data = await self.kube.secret(namespace, secret)
        except Forbidden:
            # The operator reads only the Secrets a namespace grants it by name.
            return _SiteProblem(
                Reason.SECRET_NOT_GRANTED,
                f"the operator may not read TLS Secret {secret!r}: grant it get on that "
                "Secret by name (manifests/samples/operator-secrets.yaml)",
            )
        if data is None:
            return _SiteProblem(Reason.MISSING_SECRET, f"TLS Secret {secret!r} does not exist")
        try:
            expires = certificates.not_after(data.get("tls.crt", b""))
        except ValueError:
            # Ready follows the gateway: it cannot start with this, so never becomes available.
            return _SiteProblem(
                Reason.CERTIFICATE_INVALID,
                f"TLS Secret {secret!r}: tls.crt holds no PEM certificate",
                blocks_ready=False,
            )
        now = datetime.datetime.now(datetime.UTC)
        state = certificates.assess(expires, now)
        if state is certificates.Expiry.VALID:
            return None
        described = f"TLS Secret {secret!r}: {certificates.describe(expires, now)}"
        if state is certificates.Expiry.EXPIRED:
            return _SiteProblem(Reason.CERTIFICATE_EXPIRED, f"{described}; renew it")
        # Still served and still trusted: the site works, and someone must renew in time.
        return _SiteProblem(
            Reason.CERTIFICATE_EXPIRING, f"{described}; renew it before then", blocks_ready=False
        )

    async def _catalog_problem(
        self, namespace: str, name: str, site: ImagingSite
    ) -> _SiteProblem | None:
        """Whether the site's gateways say they cannot reach the catalog `spec.catalog`
        names. A gateway that cannot be asked is no evidence either way."""
        try:
            pods = await self.kube.pods(namespace, names.selector_labels(name, "gateway"))
            ca = server = None
            if site.spec.tls is not None:
                ca = await self.kube.secret_key(namespace, site.spec.tls.secret_name, "ca.crt")
                server = f"{names.site_child(name, 'gateway')}.{namespace}.svc"
        except KubeError as err:
            log.warning("catalog check of site %s/%s: %s", namespace, name, err)
            return None
        scraped: dict[str, list[Sample] | None] = {}
        for pod in filter(pod_ready, pods):
            found = metrics_target(pod, "http", ca, server)
            try:
                scraped[found.pod] = await self.gateways.scrape(found.url, found)
            except ReadError:
                scraped[found.pod] = None
        message = catalog.problem(pods, scraped)
        return _SiteProblem(Reason.CATALOG_UNAVAILABLE, message) if message else None

    async def _model(self, world: World, name: str) -> Outcome:
        loaded = await self._load(AIModel, world, name)
        if isinstance(loaded, Outcome):
            return loaded
        body, conds, model = loaded
        gen = body["metadata"]["generation"]
        await self._apply(
            body,
            world,
            model_builders.children(body, model, world.gateways_of_model(name), self.settings),
        )
        worker = names.model_child(name)
        deployment = world.children.get(("Deployment", worker))
        fixed = model_builders.fixed_replicas(model)
        desired = (
            fixed if fixed is not None else (deployment or {}).get("spec", {}).get("replicas", 1)
        )
        status = (deployment or {}).get("status", {})
        ready_replicas = status.get("readyReplicas", 0)
        ready = desired == 0 or ready_replicas >= 1
        degraded = cond.find(conds, cond.DEGRADED)
        if degraded is None or degraded.reason != cond.METRICS_UNAVAILABLE:
            # MetricsUnavailable is the autoscaler's to set and clear.
            after = cond.set_condition(conds, cond.DEGRADED, False, "AsExpected", generation=gen)
        else:
            after = conds
        after = cond.set_condition(
            after,
            cond.PROGRESSING,
            not _rolled_out(deployment),
            "RolledOut" if _rolled_out(deployment) else "RollingOut",
            f"worker Deployment {worker}",
            generation=gen,
        )
        after = cond.set_condition(
            after,
            cond.READY,
            ready,
            ("ScaledToZero" if desired == 0 else "WorkersAvailable") if ready else "NoWorkerReady",
            f"{ready_replicas} of {desired} workers ready",
            generation=gen,
        )
        selector = ",".join(f"{k}={v}" for k, v in names.selector_labels(name, "worker").items())
        fields: Body = {
            "replicas": status.get("replicas", 0),
            "readyReplicas": ready_replicas,
            "selector": selector,
        }
        previous = body.get("status") or {}
        if fixed is not None:
            fields |= {"desiredReplicas": fixed, "scalingReason": FIXED}
            if previous.get("desiredReplicas") != fixed:
                fields["lastScaleTime"] = (
                    datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
                )
        await self._finish(body, conds, after, fields)
        return Outcome.DONE

    async def autoscale(self, namespace: str, name: str, snapshot: Snapshot) -> None:
        """One step of the model's autoscaler, under the lock its reconciles take."""
        if self.scaler is None:
            return
        key = ("AIModel", namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            world = snapshot()
            body = await self.kube.get(names.API_VERSION, "AIModel", namespace, name)
            model = _parse(AIModel, body) if body is not None else None
            if body is None or model is None:
                return  # gone, or invalid: its reconcile reports that
            deployment = world.children.get(("Deployment", names.model_child(name)))
            await self.scaler.tick(body, model, deployment, world.gateways_of_model(name))
        if key in self._again:  # a reconcile arrived while the scaler held the lock
            await self.reconcile("AIModel", namespace, name, snapshot)

    async def _policy(self, world: World, name: str) -> Outcome:
        loaded = await self._load(RoutingPolicy, world, name)
        if isinstance(loaded, Outcome):
            return loaded
        body, conds, policy = loaded
        gen = body["metadata"]["generation"]
        verdict = routing.evaluate(policy, world.parsed_models())
        after = cond.set_condition(
            conds,
            cond.RESOLVED_REFS,
            verdict.resolved,
            "Resolved" if verdict.resolved else "ModelNotFound",
            "; ".join(verdict.missing) or "every model exists",
            generation=gen,
        )
        problems = verdict.missing + verdict.uncovered
        after = cond.set_condition(
            after,
            cond.ACCEPTED,
            verdict.accepted,
            "Accepted" if verdict.accepted else "InvalidRules",
            "; ".join(problems) or "compiled into the selected sites",
            generation=gen,
        )
        sites = [s for s in world.sites if routing.selects(policy, s, world.site_labels(s))]
        fields = {"sites": sorted(sites), "warnings": verdict.warnings}
        was = cond.is_true(conds, cond.ACCEPTED)
        await self._finish(body, conds, after, fields)
        if verdict.accepted != was or cond.find(conds, cond.ACCEPTED) is None:
            reason, kind = (
                (Reason.ACCEPTED, "Normal") if verdict.accepted else (Reason.REFUSED, "Warning")
            )
            await self.kube.post_event(body, kind, reason, "; ".join(problems) or "accepted")
        return Outcome.DONE
