"""CustomResourceDefinitions generated from the pydantic models (pure: no I/O).

pydantic's JSON schema is made structural for Kubernetes: references inlined, nullable
unions collapsed to their type (optional fields are simply omitted), titles and
``additionalProperties: false`` dropped (the API server prunes or, with strict field
validation, refuses unknown fields), and defaults recomputed from the models so the
server fills in exactly what the model would. A default that is itself a model is written
out in full: the server checks CEL rules against a default before filling in its nested
defaults.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, TypeAdapter

from telerad.api.aimodel import AIModel
from telerad.api.names import GROUP, VERSION
from telerad.api.routing import RoutingPolicy
from telerad.api.site import ImagingSite

_DROP = {"title", "propertyNames"}
_CONCAT = "x-kubernetes-validations"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {**base, **over}
    if _CONCAT in base and _CONCAT in over:
        out[_CONCAT] = base[_CONCAT] + over[_CONCAT]
    return out


def _clean(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_clean(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _clean(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        rest = _clean({k: v for k, v in node.items() if k != "$ref"}, defs)
        return _merge(target, rest)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"a union of several types is not structural: {node['anyOf']}")
        rest = _clean({k: v for k, v in node.items() if k != "anyOf"}, defs)
        return _merge(_clean(branches[0], defs), rest)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "default" or (key == "additionalProperties" and value is False):
            continue
        if key == "description":
            # Docstrings wrap at the code's line length; kubectl explain wraps on its own.
            out[key] = " ".join(value.split())
        elif key == "properties":
            out[key] = {name: _clean(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _clean(value, defs)
    return out


def _models_in(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """Where a field's annotation holds a model: ("self" | "items" | "values", model)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found = [m for a in typing.get_args(annotation) if (m := _models_in(a))]
        return found[0] if found else None
    if origin is list:
        inner = _models_in(typing.get_args(annotation)[0])
        return ("items", inner[1]) if inner else None
    if origin is dict:
        inner = _models_in(typing.get_args(annotation)[1])
        return ("values", inner[1]) if inner else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("self", annotation)
    return None


def _apply_defaults(model: type[BaseModel], node: dict[str, Any]) -> None:
    for name, info in model.model_fields.items():
        prop = node["properties"][info.alias or name]
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                prop["default"] = default.model_dump(mode="json", by_alias=True, exclude_none=True)
            elif default is not None and info.annotation is not None:
                adapter: TypeAdapter[Any] = TypeAdapter(info.annotation)
                prop["default"] = adapter.dump_python(default, mode="json", by_alias=True)
        nested = _models_in(info.annotation)
        if nested:
            where, sub = nested
            target = {
                "self": prop,
                "items": prop.get("items"),
                "values": prop.get("additionalProperties"),
            }[where]
            _apply_defaults(sub, target)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a resource model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _clean(raw, raw.get("$defs", {}))
    schema.pop("$defs", None)
    _apply_defaults(model, schema)
    props = schema["properties"]
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    # A bound on metadata.name keeps the CEL name rule's cost estimate in budget.
    props["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 253}},
    }
    schema["required"] = ["spec"]
    return schema


def _condition(type_: str) -> str:
    return f'.status.conditions[?(@.type=="{type_}")].status'


@dataclass(frozen=True)
class Kind:
    model: type[BaseModel]
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[dict[str, Any], ...]
    scale: bool = False
    categories: tuple[str, ...] = field(default=("telerad",))

    @property
    def name(self) -> str:
        return self.model.__name__

    def crd(self) -> dict[str, Any]:
        subresources: dict[str, Any] = {"status": {}}
        if self.scale:
            subresources["scale"] = {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            }
        age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": f"{self.plural}.{GROUP}",
                "labels": {"app.kubernetes.io/part-of": "telerad"},
            },
            "spec": {
                "group": GROUP,
                "scope": "Namespaced",
                "names": {
                    "kind": self.name,
                    "listKind": f"{self.name}List",
                    "plural": self.plural,
                    "singular": self.name.lower(),
                    "shortNames": list(self.short_names),
                    "categories": list(self.categories),
                },
                "versions": [
                    {
                        "name": VERSION,
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": openapi_schema(self.model)},
                        "subresources": subresources,
                        "additionalPrinterColumns": [*self.columns, age],
                    }
                ],
            },
        }


KINDS: tuple[Kind, ...] = (
    Kind(
        ImagingSite,
        "imagingsites",
        ("site", "sites"),
        (
            {"name": "AE Title", "type": "string", "jsonPath": ".spec.aeTitle"},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
            {"name": "Ready", "type": "string", "jsonPath": _condition("Ready")},
            {"name": "Queued", "type": "integer", "jsonPath": ".status.jobsQueued"},
            {
                "name": "Received",
                "type": "integer",
                "jsonPath": ".status.studiesReceived",
                "priority": 1,
            },
        ),
    ),
    Kind(
        AIModel,
        "aimodels",
        ("aim",),
        (
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
            {"name": "Version", "type": "string", "jsonPath": ".spec.model.version", "priority": 1},
            {"name": "GPUs", "type": "integer", "jsonPath": ".spec.gpu.count"},
            {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Queue", "type": "integer", "jsonPath": ".status.queueDepth"},
            {"name": "Ready", "type": "string", "jsonPath": _condition("Ready")},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": ".status.scalingReason",
                "priority": 1,
            },
        ),
        scale=True,
    ),
    Kind(
        RoutingPolicy,
        "routingpolicies",
        ("rp", "routing"),
        (
            {"name": "Accepted", "type": "string", "jsonPath": _condition("Accepted")},
            {"name": "Resolved", "type": "string", "jsonPath": _condition("ResolvedRefs")},
            {"name": "Sites", "type": "string", "jsonPath": ".status.sites", "priority": 1},
        ),
    ),
)
