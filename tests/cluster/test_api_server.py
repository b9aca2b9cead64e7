"""The generated CRDs on the real API server: samples accepted, wrong objects refused
with the documented message, server defaults equal to the model's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.api_examples import Example, invalid_examples, samples
from tests.cluster.conftest import Cluster

SAMPLES = samples()
INVALID = invalid_examples()


def _create(cluster: Cluster, ns: str, obj: dict[str, Any], *, dry_run: bool = False) -> Any:
    args = ["-n", ns, "create", "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    return json.loads(cluster.kubectl(*args, input=json.dumps(obj)).stdout)


@pytest.mark.usefixtures("crds")
def test_every_sample_is_accepted_and_round_trips(cluster: Cluster, namespace: str) -> None:
    for example in SAMPLES:
        dry = _create(cluster, namespace, example.obj, dry_run=True)
        stored = _create(cluster, namespace, example.obj)
        assert dry["spec"] == stored["spec"]
        model = example.model
        # The server's defaults are the model's defaults...
        assert model.from_wire(example.obj).to_wire()["spec"] == stored["spec"], example.path.name
        # ...and what it stores parses back into the model and dumps to the same.
        read_back = cluster.kubectl_json(
            "-n", namespace, "get", example.obj["kind"].lower(), example.obj["metadata"]["name"]
        )
        assert model.from_wire(read_back).to_wire()["spec"] == read_back["spec"]


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.path.name)
def test_invalid_example_is_refused_with_its_message(
    cluster: Cluster, namespace: str, example: Example
) -> None:
    proc = cluster.kubectl("-n", namespace, "create", "-f", str(example.path), check=False)
    assert proc.returncode != 0, f"{example.path.name} was accepted"
    assert example.expect in proc.stderr


@pytest.mark.usefixtures("crds")
def test_storage_class_is_immutable(cluster: Cluster, namespace: str) -> None:
    site = next(e.obj for e in SAMPLES if e.obj["metadata"]["name"] == "st-marys")
    _create(cluster, namespace, site)
    message = "storageClassName is immutable: a tier's volume cannot move to another storage class"
    for patch in (
        {"spec": {"storage": {"hot": {"storageClassName": "other-class"}}}},
        {"spec": {"storage": {"hot": {"storageClassName": None}}}},
    ):
        proc = cluster.kubectl(
            "-n",
            namespace,
            "patch",
            "imagingsite",
            "st-marys",
            "--type=merge",
            "-p",
            json.dumps(patch),
            check=False,
        )
        assert proc.returncode != 0
        assert message in proc.stderr
    # Other tier fields stay editable.
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "imagingsite",
        "st-marys",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"storage": {"hot": {"size": "600Gi"}}}}),
    )


@pytest.mark.usefixtures("crds")
def test_kubectl_get_telerad_lists_the_three_kinds(cluster: Cluster, namespace: str) -> None:
    for example in SAMPLES:
        _create(cluster, namespace, example.obj)
    out = cluster.kubectl("-n", namespace, "get", "telerad").stdout
    for kind in (
        "aimodel.telerad.io/ct-head-hyperdensity",
        "imagingsite.telerad.io/st-marys",
        "routingpolicy.telerad.io/default-routing",
    ):
        assert kind in out
    assert "AE TITLE" in out
    assert "TELERAD_STM" in out
    resources = cluster.kubectl(
        "api-resources", "--categories=telerad", "-o", "name"
    ).stdout.split()
    assert sorted(resources) == [
        "aimodels.telerad.io",
        "imagingsites.telerad.io",
        "routingpolicies.telerad.io",
    ]


@pytest.mark.usefixtures("crds")
def test_explain_shows_field_documentation(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "imagingsite.spec.storage").stdout
    assert "Storage tiers and retention." in out
    assert "retentionDays" in out
    assert "Days after which a study is deleted from every tier." in out
    hot = cluster.kubectl("explain", "imagingsite.spec.storage.hot.storageClassName").stdout
    assert "Immutable" in hot


@pytest.mark.usefixtures("crds")
def test_scale_subresource(cluster: Cluster, namespace: str) -> None:
    model = next(e.obj for e in SAMPLES if e.obj["kind"] == "AIModel")
    _create(cluster, namespace, model)
    name = model["metadata"]["name"]
    cluster.kubectl("-n", namespace, "scale", f"aimodel/{name}", "--replicas=3")
    got = cluster.kubectl_json("-n", namespace, "get", "aimodel", name)
    assert got["spec"]["replicas"] == 3
    raw = cluster.kubectl(
        "-n",
        namespace,
        "get",
        "--raw",
        f"/apis/telerad.io/v1alpha1/namespaces/{namespace}/aimodels/{name}/scale",
    ).stdout
    scale = json.loads(raw)
    assert scale["spec"]["replicas"] == 3
