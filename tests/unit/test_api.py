"""The API models, their generated CRDs and the shipped examples, without a cluster."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from telerad.api import conditions, names
from telerad.api.base import Rule
from telerad.api.config import GatewayConfig
from telerad.api.crd import KINDS
from telerad.api.site import ImagingSite
from telerad.api.types import Condition, ConditionStatus
from telerad.cli import cli
from tests.api_examples import ROOT, Example, invalid_examples, samples

SAMPLES = samples()
INVALID = invalid_examples()


def test_enough_examples() -> None:
    kinds = {e.obj["kind"] for e in SAMPLES}
    assert kinds == {"ImagingSite", "AIModel", "RoutingPolicy"}
    assert len(INVALID) >= 15


@pytest.mark.parametrize("example", SAMPLES, ids=lambda e: e.path.name)
def test_sample_parses_and_dumps_what_it_read(example: Example) -> None:
    parsed = example.model.from_wire(example.obj)
    wire = parsed.to_wire()
    # Every field the sample sets survives; the rest are defaults.
    assert _subset(example.obj["spec"], wire["spec"])
    assert example.model.from_wire(wire) == parsed


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and _subset(v, big[k]) for k, v in small.items()
        )
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return bool(small == big)


def _rule_messages() -> set[str]:
    found = set()
    for kind in KINDS:
        stack: list[Any] = [kind.crd()]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                found.update(r["message"] for r in node.get("x-kubernetes-validations", []))
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return found


@pytest.mark.parametrize("example", INVALID, ids=lambda e: e.path.name)
def test_invalid_example_is_refused_by_the_model_too(example: Example) -> None:
    with pytest.raises(ValidationError) as refused:
        example.model.from_wire(example.obj)
    # Where the server answers with one of our rule messages, the model says the same.
    for message in _rule_messages():
        if message in example.expect:
            assert message in str(refused.value)


def test_committed_crds_match_the_models() -> None:
    result = CliRunner().invoke(cli, ["crds", "--check", "--dir", str(ROOT / "crds")])
    assert result.exit_code == 0, result.output


def test_crds_check_fails_on_drift(tmp_path: Path) -> None:
    assert CliRunner().invoke(cli, ["crds", "--dir", str(tmp_path)]).exit_code == 0
    target = tmp_path / "aimodels.yaml"
    target.write_text(target.read_text().replace("minReplicas", "minimumReplicas"))
    result = CliRunner().invoke(cli, ["crds", "--check", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "aimodels.yaml" in result.output
    assert "telerad crds" in result.output


def _walk_schema(node: dict[str, Any], path: str) -> list[str]:
    """Structural-schema violations: a node without a type, refs, unions, closed objects."""
    problems = []
    if "type" not in node:
        problems.append(f"{path}: no type")
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "title"):
        if banned in node:
            problems.append(f"{path}: {banned}")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    for name, sub in node.get("properties", {}).items():
        problems += _walk_schema(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _walk_schema(node[key], f"{path}[{key}]")
    return problems


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_schema_is_structural_and_documented(kind: Any) -> None:
    schema = kind.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk_schema(schema, kind.name) == []
    undocumented = []
    stack = [("spec", schema["properties"]["spec"]), ("status", schema["properties"]["status"])]
    while stack:
        path, node = stack.pop()
        if not node.get("description"):
            undocumented.append(path)
        for name, sub in node.get("properties", {}).items():
            stack.append((f"{path}.{name}", sub))
        if isinstance(node.get("items"), dict) and node["items"].get("properties"):
            stack.append((f"{path}[]", node["items"]))
    assert undocumented == []


def test_kind_metadata() -> None:
    by_name = {k.name: k.crd()["spec"] for k in KINDS}
    for spec in by_name.values():
        assert spec["names"]["categories"] == ["telerad"]
        assert spec["names"]["shortNames"]
        version = spec["versions"][0]
        assert version["subresources"]["status"] == {}
        assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Age"}
    assert by_name["AIModel"]["versions"][0]["subresources"]["scale"]["specReplicasPath"] == (
        ".spec.replicas"
    )


def test_defaults_in_schema_match_model_defaults() -> None:
    spec = next(k for k in KINDS if k.name == "ImagingSite").crd()["spec"]
    props = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    minimal = ImagingSite.from_wire(
        {"metadata": {"name": "s"}, "spec": {"aeTitle": "A", "allowedCallers": [{"aeTitle": "B"}]}}
    ).to_wire()["spec"]
    for name, prop in props.items():
        if "default" in prop:
            assert prop["default"] == minimal[name], name


def test_longest_child_name_fits_exactly() -> None:
    site = "s" * names.SITE_NAME_MAX
    model = "m" * names.MODEL_NAME_MAX
    longest = max(len(names.site_child(site, part)) for part in names.SITE_SUFFIXES)
    assert longest == 63
    assert len(names.model_child(model)) == 63
    assert names.selector_labels(site, "gateway").items() <= names.labels(site, "gateway").items()


@pytest.mark.parametrize(
    ("ae_title", "ok"),
    [
        ("A", True),
        (" A ", True),
        ("X" * 16, True),
        ("X" * 17, False),
        ("", False),
        ("   ", False),
        ("A\\B", False),
        ("A\tB", False),
        ("ÄRZTE", False),
        ("A~!@#", True),
    ],
)
def test_ae_title_syntax(ae_title: str, ok: bool) -> None:
    obj = {
        "metadata": {"name": "s"},
        "spec": {"aeTitle": ae_title, "allowedCallers": [{"aeTitle": "B"}]},
    }
    if ok:
        ImagingSite.from_wire(obj)
    else:
        with pytest.raises(ValidationError):
            ImagingSite.from_wire(obj)


def test_rule_field_path_is_written() -> None:
    assert Rule("true", "m", field_path=".spec.x").schema()["fieldPath"] == ".spec.x"


T0 = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = conditions.set_condition(
        [], "Ready", False, "Starting", "gateway starting", generation=1, now=T0
    )
    again = conditions.set_condition(
        first, "Ready", False, "Waiting", "still", generation=2, now=T1
    )
    assert again[0].last_transition_time == T0
    assert (again[0].reason, again[0].observed_generation) == ("Waiting", 2)
    flipped = conditions.set_condition(again, "Ready", True, "Available", now=T1)
    assert flipped[0].last_transition_time == T1
    assert conditions.is_true(flipped, "Ready")


def test_set_condition_keeps_the_others_in_order() -> None:
    conds = conditions.set_condition([], "Ready", True, "Available", now=T0)
    conds = conditions.set_condition(conds, "Degraded", False, "AsExpected", now=T0)
    conds = conditions.set_condition(conds, "Ready", False, "Unavailable", now=T1)
    assert [c.type for c in conds] == ["Ready", "Degraded"]
    assert conds[1] == Condition(
        type="Degraded", status=ConditionStatus.FALSE, reason="AsExpected", last_transition_time=T0
    )
    assert conditions.find(conds, "Missing") is None


def test_gateway_config_reuses_spec_parts(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "site: st-marys\naeTitle: TELERAD_STM\nallowedCallers: [{aeTitle: CT01}]\n"
        "storage: {hotDir: /data/hot}\n"
        "routing:\n- policy: p\n  name: ct\n"
        "  models: [{name: ct-head, intendedUse: {modalities: [CT]}}]\n"
    )
    config = GatewayConfig.load(path)
    assert config.routing[0].models[0].intended_use.modalities == ["CT"]
    assert config.dimse.max_associations == 32
    path.write_text(path.read_text().replace("TELERAD_STM", "BAD\\AE"))
    with pytest.raises(ValidationError, match="DICOM AE title"):
        GatewayConfig.load(path)
