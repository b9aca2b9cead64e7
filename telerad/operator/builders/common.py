"""Metadata every child carries: deterministic name, standard labels, owner reference."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from telerad.api import names

CONFIG_HASH_ANNOTATION = f"{names.GROUP}/config-hash"
Manifest = dict[str, Any]

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def owner_reference(owner: Manifest) -> Manifest:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    owner: Manifest,
    name: str,
    component: str,
    *,
    owned: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Manifest:
    meta: Manifest = {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": {**names.labels(owner["metadata"]["name"], component), **(labels or {})},
    }
    if annotations:
        meta["annotations"] = annotations
    if owned:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta


def config_hash(data: dict[str, str]) -> str:
    """Changes exactly when the rendered configuration does, so the pod rolls."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def resources(spec: Any) -> Manifest:
    out: Manifest = {}
    if spec.requests:
        out["requests"] = dict(spec.requests)
    if spec.limits:
        out["limits"] = dict(spec.limits)
    return out
