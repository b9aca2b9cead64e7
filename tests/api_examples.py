"""The sample and invalid objects shipped with the API, shared by unit and cluster tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from telerad.api.aimodel import AIModel
from telerad.api.base import ApiModel
from telerad.api.routing import RoutingPolicy
from telerad.api.site import ImagingSite

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "manifests" / "samples"
INVALID = ROOT / "crds" / "examples" / "invalid"
MODELS: dict[str, type[ApiModel]] = {
    "ImagingSite": ImagingSite,
    "AIModel": AIModel,
    "RoutingPolicy": RoutingPolicy,
}


@dataclass(frozen=True)
class Example:
    path: Path
    obj: dict[str, Any]
    expect: str = ""

    @property
    def model(self) -> type[ApiModel]:
        return MODELS[self.obj["kind"]]


def samples() -> list[Example]:
    found = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        obj = next(yaml.safe_load_all(path.read_text()))
        if obj.get("kind") in MODELS:  # not the namespace's grant (a Role and its binding)
            found.append(Example(path, obj))
    return found


def invalid_examples() -> list[Example]:
    found = []
    for path in sorted(INVALID.glob("*.yaml")):
        text = path.read_text()
        expect = next(
            line.removeprefix("# expect:").strip()
            for line in text.splitlines()
            if line.startswith("# expect:")
        )
        found.append(Example(path, yaml.safe_load(text), expect))
    return found
