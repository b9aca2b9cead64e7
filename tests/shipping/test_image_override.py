"""A platform team's own registry: one kustomize `images:` override in an overlay of
manifests/default and manifests/samples reaches the operator's container, the operator's
TELERAD_IMAGE setting, and through the operator's builders every pod it renders (the
gateways' and the workers')."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from telerad.api.aimodel import AIModel
from telerad.api.site import ImagingSite
from telerad.operator.builders import model as model_builders
from telerad.operator.builders import site as site_builders
from telerad.operator.settings import OperatorSettings
from tests.cluster.conftest import k8s_bin_dir

ROOT = Path(__file__).resolve().parents[2]
OURS = "registry.example/platform/telerad:0.1.0-abc123"


def overlay(tmp_path: Path) -> list[dict[str, Any]]:
    # kustomize takes bases by relative path only.
    bases = [os.path.relpath(ROOT / "manifests" / d, tmp_path) for d in ("default", "samples")]
    name, tag = OURS.rsplit(":", 1)
    kustomization = {
        "resources": bases,
        "images": [
            {"name": "ghcr.io/telerad/telerad", "newName": name, "newTag": tag},
            {"name": "ghcr.io/telerad/worker", "newName": name, "newTag": tag},
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = subprocess.run(
        [str(k8s_bin_dir() / "kubectl"), "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_images(manifests: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        m["metadata"]["name"]: [
            c["image"]
            for key in ("initContainers", "containers")
            for c in m["spec"]["template"]["spec"].get(key, [])
        ]
        for m in manifests
        if m["kind"] in {"Deployment", "StatefulSet"}
    }


def owned(body: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"].update(uid=f"uid-{body['metadata']['name']}", generation=1)
    return body


def test_one_images_override_reaches_the_operator_and_every_pod_it_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = overlay(tmp_path)
    (operator,) = [d for d in built if d["kind"] == "Deployment"]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["image"] == OURS
    # The operator is configured only by its environment: read it as the pod would.
    for env in container["env"]:
        monkeypatch.setenv(env["name"], env["value"])
    settings = OperatorSettings()
    assert settings.image == OURS

    sites = {d["metadata"]["name"]: d for d in built if d["kind"] == "ImagingSite"}
    models = [d for d in built if d["kind"] == "AIModel"]
    assert sites
    assert models
    rendered: list[dict[str, Any]] = []
    for body in sites.values():
        rendered += site_builders.children(owned(body), ImagingSite.from_wire(body), [], settings)
    gateways = {name: ImagingSite.from_wire(body) for name, body in sites.items()}
    for body in models:
        model = AIModel.from_wire(body)
        rendered += model_builders.children(owned(body), model, gateways, settings)
    images = pod_images(rendered)
    assert len(images) == len(sites) + len(models), images
    assert all(pod == [OURS] for pod in images.values()), images


def test_without_an_override_the_manifests_name_the_published_image() -> None:
    """The control: the override test above would pass trivially if the overlay ignored
    the bases' images."""
    done = subprocess.run(
        [str(k8s_bin_dir() / "kubectl"), "kustomize", str(ROOT / "manifests" / "default")],
        capture_output=True,
        text=True,
        check=True,
    )
    (operator,) = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == env["TELERAD_IMAGE"] == "ghcr.io/telerad/telerad:0.1.0"
