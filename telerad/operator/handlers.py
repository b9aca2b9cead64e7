"""kopf handlers: thin. Each turns a watch event into a call to the reconciler, and
reconcile failures into kopf's retry semantics.

kopf has no Owns(): children are watched by the managed-by label and mapped back to
their owner through the instance and component labels. Objects that depend on each
other (a policy names models, a site's rules name models, a worker lists the gateways
that route to it) are re-reconciled when what they depend on changes.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import kopf

from telerad.api import names
from telerad.operator import startup
from telerad.operator.k8s import KubeError
from telerad.operator.metrics import MANAGED
from telerad.operator.reconcile import Outcome, Reconciler, Snapshot, World
from telerad.operator.settings import OperatorSettings

log = logging.getLogger(__name__)

KIND_OF = {"imagingsites": "ImagingSite", "aimodels": "AIModel", "routingpolicies": "RoutingPolicy"}
OWNER_OF_COMPONENT = {"gateway": "ImagingSite", "worker": "AIModel"}
CHILDREN = (  # (apiVersion, plural) of every kind of child
    ("v1", "configmaps"),
    ("v1", "services"),
    ("v1", "serviceaccounts"),
    ("v1", "persistentvolumeclaims"),
    ("apps/v1", "deployments"),
    ("networking.k8s.io/v1", "networkpolicies"),
    ("policy/v1", "poddisruptionbudgets"),
)
KIND_OF_CHILD = {
    "configmaps": "ConfigMap",
    "services": "Service",
    "serviceaccounts": "ServiceAccount",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "deployments": "Deployment",
    "networkpolicies": "NetworkPolicy",
    "poddisruptionbudgets": "PodDisruptionBudget",
}
RETRY_FIRST = 2.0
RETRY_MAX = 300.0


def _world(namespace: str | None, kwargs: dict[str, Any]) -> World:
    ns = namespace or ""

    def named(plural: str) -> dict[str, Any]:
        return {b["metadata"]["name"]: b for b in kwargs[f"{plural}_index"].get(ns, [])}

    children = {
        (b["kind"], b["metadata"]["name"]): b
        for _, plural in CHILDREN
        for b in kwargs[f"{plural}_cache"].get(ns, [])
    }
    return World(ns, named("imagingsites"), named("aimodels"), named("routingpolicies"), children)


def backoff(retry: int) -> float:
    """Seconds before retry number ``retry`` (0-based) after an API error."""
    return min(RETRY_FIRST * float(2**retry), RETRY_MAX)


async def _run(
    reconciler: Reconciler,
    kind: str,
    namespace: str,
    name: str,
    snapshot: Snapshot,
    *,
    strict: bool,
    retry: int = 0,
) -> None:
    try:
        outcome = await reconciler.reconcile(kind, namespace, name, snapshot)
    except KubeError as err:
        raise kopf.TemporaryError(str(err), delay=backoff(retry)) from err
    if outcome is Outcome.INVALID and strict:
        # Status says why; retrying an invalid spec would only repeat it.
        raise kopf.PermanentError(
            f"{kind} {namespace}/{name}: invalid spec, see its Degraded condition"
        )


async def _dependents(
    reconciler: Reconciler, kind: str, world: World, name: str, snapshot: Snapshot
) -> None:
    """Reconcile what depends on the object that changed (found in ``world``)."""
    ns = world.namespace
    if kind == "ImagingSite":
        await reconciler.reconcile_all("AIModel", ns, world.models_of_site(name), snapshot)
        await reconciler.reconcile_all(
            "RoutingPolicy", ns, world.policies_selecting(name), snapshot
        )
    elif kind == "AIModel":
        users = world.policies_using(name)
        await reconciler.reconcile_all("RoutingPolicy", ns, users, snapshot)
        await reconciler.reconcile_all(
            "ImagingSite", ns, {s for p in users for s in world.sites_of(p)}, snapshot
        )
    else:
        await reconciler.reconcile_all("ImagingSite", ns, world.sites_of(name), snapshot)
        await reconciler.reconcile_all("AIModel", ns, world.models_of_policy(name), snapshot)


def index_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
    # Handlers wait until every index is filled, so after a restart no reconcile ever
    # sees (and writes a config from) half a namespace.
    return {namespace or "": dict(body)}


def cache_child(
    *, namespace: str | None, body: kopf.Body, resource: kopf.Resource, **_: Any
) -> dict[str, Any]:
    """The watch cache of children that reconciles compare against instead of a GET each.
    managedFields are dropped: they are most of an object's size and never compared."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    kind = body.get("kind") or KIND_OF_CHILD[resource.plural]
    return {namespace or "": {**dict(body), "kind": kind, "metadata": meta}}


def _snapshot(namespace: str | None, kwargs: dict[str, Any]) -> Snapshot:
    return partial(_world, namespace, kwargs)


async def on_change(
    *,
    resource: kopf.Resource,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    retry: int,
    **kwargs: Any,
) -> None:
    kind = KIND_OF[resource.plural]
    snapshot = _snapshot(namespace, kwargs)
    MANAGED.labels(kind).set(sum(len(v) for v in kwargs[f"{resource.plural}_index"].values()))
    await _run(memo["reconciler"], kind, namespace or "", name, snapshot, strict=True, retry=retry)
    await _dependents(memo["reconciler"], kind, snapshot(), name, snapshot)


async def on_delete(
    *,
    resource: kopf.Resource,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    kind = KIND_OF[resource.plural]
    world = _world(namespace, kwargs)
    # The index has dropped the object; what depended on it is still computed from it.
    {"ImagingSite": world.sites, "AIModel": world.models, "RoutingPolicy": world.policies}[kind][
        name
    ] = dict(body)
    if kind == "AIModel" and memo["reconciler"].scaler is not None:
        memo["reconciler"].scaler.forget(namespace or "", name)
    await _dependents(memo["reconciler"], kind, world, name, _snapshot(namespace, kwargs))


async def on_resync(
    *, resource: kopf.Resource, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    kind = KIND_OF[resource.plural]
    await _run(
        memo["reconciler"], kind, namespace or "", name, _snapshot(namespace, kwargs), strict=False
    )


async def on_child_event(
    *,
    type: str | None,
    labels: kopf.Labels,
    body: kopf.Body,
    namespace: str | None,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    owner = OWNER_OF_COMPONENT.get(labels.get("app.kubernetes.io/component", ""))
    instance = labels.get("app.kubernetes.io/instance")
    # type None is the initial listing, which the resume handlers already cover.
    if owner is None or instance is None or type is None:
        return
    kube, ns = memo["kube"], namespace or ""
    kind = body.get("kind") or KIND_OF_CHILD[kwargs["resource"].plural]
    child, version = body["metadata"]["name"], body["metadata"].get("resourceVersion", "")
    if type == "DELETED":
        kube.forget(kind, ns, child)
    elif kube.wrote(kind, ns, child, version):
        return  # the echo of the operator's own apply: nothing new for the owner
    try:
        await memo["reconciler"].reconcile(owner, ns, instance, _snapshot(namespace, kwargs))
    except KubeError as err:
        log.warning(
            "reconcile of %s %s/%s after a child event failed: %s", owner, namespace, instance, err
        )


async def on_autoscale(*, namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    try:
        await memo["reconciler"].autoscale(namespace or "", name, _snapshot(namespace, kwargs))
    except KubeError as err:
        # The next tick tries again; a timer that raised would only be retried sooner.
        log.warning("autoscaler of %s/%s: %s", namespace, name, err)


def build(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator, configured by ``settings``."""
    registry = kopf.OperatorRegistry()
    startup.register(registry, settings)
    for plural in KIND_OF:
        resource = (names.GROUP, names.VERSION, plural)
        kopf.index(*resource, id=f"{plural}_index", registry=registry)(index_by_namespace)
        for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
            decorator(*resource, registry=registry)(on_change)
        kopf.on.delete(*resource, optional=True, registry=registry)(on_delete)
        kopf.timer(
            *resource,
            interval=settings.resync_seconds,
            initial_delay=settings.resync_seconds,
            registry=registry,
        )(on_resync)
    if settings.autoscale_interval_seconds:
        kopf.timer(
            names.GROUP,
            names.VERSION,
            "aimodels",
            id="autoscale",
            interval=settings.autoscale_interval_seconds,
            initial_delay=settings.autoscale_interval_seconds,
            registry=registry,
        )(on_autoscale)
    for api_version, plural in CHILDREN:
        group, _, version = api_version.rpartition("/")
        child = (group, version, plural) if group else (version, plural)
        managed = {"app.kubernetes.io/managed-by": names.FIELD_MANAGER}
        kopf.index(*child, labels=managed, id=f"{plural}_cache", registry=registry)(cache_child)
        kopf.on.event(*child, labels=managed, registry=registry)(on_child_event)
    return registry
