"""Reads and writes against the API server, for the reconcilers.

Children are written with server-side apply under the field manager
``telerad-operator``, a complete desired object each time, and only when the live
object does not already hold every field of it: an unchanged resync sends no write.
"""

from __future__ import annotations

import base64
import datetime
import logging
import time
from decimal import InvalidOperation
from typing import Any, cast

import httpx2 as httpx
from lightkube import ApiError, AsyncClient
from lightkube.codecs import from_dict
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import Event, Pod
from lightkube.types import PatchType
from lightkube.utils.quantity import parse_quantity

from telerad.api.names import FIELD_MANAGER, GROUP, VERSION
from telerad.operator.metrics import WRITES

log = logging.getLogger(__name__)
APPLIED_TTL = 30.0  # seconds an applied object stands in for the watch cache

PLURALS = {"ImagingSite": "imagingsites", "AIModel": "aimodels", "RoutingPolicy": "routingpolicies"}
# lightkube's typed overloads do not cover resource classes chosen at run time; this
# module is the boundary, so they are handled as Any here and nowhere else.
CUSTOM: dict[str, Any] = {
    kind: create_namespaced_resource(GROUP, VERSION, kind, plural)
    for kind, plural in PLURALS.items()
}
SCALED_OBJECT = create_namespaced_resource("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects")
AUTOSCALER_FIELD_MANAGER = f"{FIELD_MANAGER}-autoscaler"


def _resource(api_version: str, kind: str) -> Any:
    return CUSTOM[kind] if kind in CUSTOM else resource_registry.load(api_version, kind)


class KubeError(Exception):
    """The API server failed or could not be reached; worth retrying."""


class Forbidden(KubeError):
    """The operator's RBAC does not allow the request; retried too, as a grant may come."""


def _wrap(err: Exception) -> KubeError:
    if isinstance(err, ApiError):
        error = Forbidden if err.status.code == 403 else KubeError
        return error(f"API server answered {err.status.code}: {err.status.message}")
    return KubeError(f"API server unreachable: {err}")


def _same_quantity(want: object, have: object) -> bool:
    try:
        return bool(parse_quantity(str(want)) == parse_quantity(str(have)))
    except (ValueError, InvalidOperation, TypeError):
        return False


def contains(want: Any, have: Any, path: str = "") -> bool:
    """Whether ``have`` (a live object) holds every field of ``want`` (a desired one).
    Fields the server adds are ignored; empty values match absent ones; resource
    quantities compare by value, as the server normalises them ("0.5" -> "500m")."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return not want and have is None
        return all(contains(v, have.get(k), f"{path}.{k}") for k, v in want.items())
    if isinstance(want, list):
        if not want:
            return not have
        pairs = (
            zip(want, have, strict=True)
            if isinstance(have, list) and len(have) == len(want)
            else None
        )
        return pairs is not None and all(contains(w, h, path) for w, h in pairs)
    if want == have:
        return True
    return ".resources." in path and _same_quantity(want, have)


def _version(obj: dict[str, Any]) -> int:
    """resourceVersion as a number: opaque by contract, an etcd revision in practice; an
    unreadable one sorts first, so the watch cache is believed."""
    try:
        return int(obj["metadata"].get("resourceVersion", ""))
    except ValueError:
        return -1


class Kube:
    def __init__(self, client: AsyncClient) -> None:
        self._client = cast(Any, client)
        self._applied: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    @classmethod
    def connect(cls) -> Kube:
        """From KUBECONFIG, ~/.kube/config or the pod's service account."""
        return cls(AsyncClient(field_manager=FIELD_MANAGER))

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._client, method)(*args, **kwargs)
        except (ApiError, httpx.HTTPError) as err:
            raise _wrap(err) from err

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            obj = await self._client.get(_resource(api_version, kind), name, namespace=namespace)
        except ApiError as err:
            if err.status.code == 404:
                return None
            raise _wrap(err) from err
        except httpx.HTTPError as err:
            raise _wrap(err) from err
        return cast(dict[str, Any], obj.to_dict())

    async def ensure(self, desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
        """Make the cluster hold ``desired``, given the ``live`` object as the watch cache
        last saw it (None: absent); return whether a write was needed. Until the watch
        brings back an object this client wrote, the object its apply returned stands in
        for it, so a stale cache does not cause the same write twice."""
        meta = desired["metadata"]
        key = (desired["kind"], meta["namespace"], meta["name"])
        live = self._newest(key, live)
        if live is not None and contains(desired, live):
            return False
        applied = await self._call(
            "apply", from_dict(desired), field_manager=FIELD_MANAGER, force=True
        )
        written = cast(dict[str, Any], applied.to_dict())
        written["metadata"].pop("managedFields", None)
        self._applied[key] = (time.monotonic(), written)
        WRITES.labels(desired["kind"]).inc()
        log.info("applied %s %s/%s", desired["kind"], meta["namespace"], meta["name"])
        return True

    def _newest(
        self, key: tuple[str, str, str], live: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        entry = self._applied.get(key)
        if entry is None:
            return live
        written_at, mine = entry
        caught_up = live is not None and _version(live) >= _version(mine)
        # Past the age limit the cache is believed even if an event was missed.
        if caught_up or time.monotonic() - written_at > APPLIED_TTL:
            del self._applied[key]
            return live
        return mine

    def wrote(self, kind: str, namespace: str, name: str, resource_version: str) -> bool:
        """Whether this exact version of the object is this client's own last write."""
        entry = self._applied.get((kind, namespace, name))
        return entry is not None and entry[1]["metadata"].get("resourceVersion") == resource_version

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object was deleted: what this client last wrote of it no longer stands."""
        self._applied.pop((kind, namespace, name), None)

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        try:
            await self._client.patch(
                CUSTOM[kind].Status,
                name,
                {"status": status},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        except ApiError as err:
            if err.status.code == 404:  # deleted meanwhile: nothing left to report on
                return
            raise _wrap(err) from err
        except httpx.HTTPError as err:
            raise _wrap(err) from err
        WRITES.labels(f"{kind}/status").inc()

    async def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's data, decoded; None when the Secret does not exist."""
        secret = await self.get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    async def secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        """One key of a Secret, decoded; None when the Secret or the key is missing."""
        return (await self.secret(namespace, name) or {}).get(key)

    async def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        found = await self._list(Pod, namespace, labels=labels)
        return found if found is not None else []

    async def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set a Deployment's replicas through its scale subresource, as an autoscaler
        does, under a field manager of its own (the operator's applies leave them be)."""
        await self._call(
            "patch",
            Deployment.Scale,
            deployment,
            {"spec": {"replicas": replicas}},
            namespace=namespace,
            patch_type=PatchType.MERGE,
            field_manager=AUTOSCALER_FIELD_MANAGER,
        )
        WRITES.labels("Deployment/scale").inc()

    async def autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        """HorizontalPodAutoscalers and KEDA ScaledObjects of a namespace (none of the
        latter where KEDA is not installed)."""
        found = []
        for kind, resource in (
            ("HorizontalPodAutoscaler", HorizontalPodAutoscaler),
            ("ScaledObject", SCALED_OBJECT),
        ):
            found += [{**o, "kind": kind} for o in await self._list(resource, namespace) or []]
        return found

    async def _list(
        self, resource: Any, namespace: str, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]] | None:
        """Every object of a kind in a namespace; None when the API server does not
        serve the kind (a CRD that is not installed)."""
        try:
            return [
                cast(dict[str, Any], o.to_dict())
                async for o in self._client.list(resource, namespace=namespace, labels=labels)
            ]
        except ApiError as err:
            if err.status.code == 404:
                return None
            raise _wrap(err) from err
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 404:  # lightkube's list raises it unwrapped
                return None
            raise _wrap(err) from err
        except httpx.HTTPError as err:
            raise _wrap(err) from err

    async def post_event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on ``owner``. Messages carry names and reasons, never study data."""
        meta = owner["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = Event.from_dict(
            {
                "metadata": {
                    "name": f"{meta['name']}.{now.strftime('%Y%m%d%H%M%S%f')}",
                    "namespace": meta["namespace"],
                },
                "involvedObject": {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "type": type_,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "firstTimestamp": now.isoformat(),
                "lastTimestamp": now.isoformat(),
                "count": 1,
            }
        )
        try:
            await self._client.create(event)
        except (ApiError, httpx.HTTPError) as err:
            # An event is a courtesy to people; losing one must not fail a reconcile.
            log.warning("could not post event %s on %s: %s", reason, meta["name"], err)
            return
        WRITES.labels("Event").inc()

    async def close(self) -> None:
        await self._client.close()
