"""Routing a completed study: first matching rule, DICOM wildcards, intended use."""

from __future__ import annotations

import pytest

from telerad.api.config import CompiledRule
from telerad.api.routing import Match
from telerad.api.types import Priority
from telerad.runtime.gateway.example import CHEST_XRAY, CT_HEAD
from telerad.runtime.routing import matches, reopens_study, route
from telerad.runtime.store.catalog import StudySummary


def summary(**fields: object) -> StudySummary:
    base: dict[str, object] = {
        "study_uid": "1.2.3",
        "round": 1,
        "modalities": frozenset({"CT"}),
        "body_parts": frozenset({"HEAD"}),
        "sop_classes": frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
        "calling_ae_titles": frozenset({"ED_CT01"}),
        "description": "CT HEAD WO CONTRAST",
        "instances": 40,
        "first_received": 0.0,
    }
    base.update(fields)
    return StudySummary(**base)  # type: ignore[arg-type]


# A vendor's model: its jobs are de-identified whatever the rule says.
THIRD_PARTY = CHEST_XRAY.model_copy(update={"name": "chest-xray-triage", "third_party": True})
RULES = [
    CompiledRule(
        policy="p", name="ed-head", models=[CT_HEAD], priority=Priority.STAT,
        match=Match(modalities=["CT"], calling_ae_titles=["ED_CT01"]),
    ),
    CompiledRule(
        policy="p", name="head", models=[CT_HEAD], priority=Priority.ROUTINE,
        match=Match(modalities=["CT"], study_description="*head*"),
    ),
    CompiledRule(
        policy="p", name="chest", models=[THIRD_PARTY, CT_HEAD], priority=Priority.URGENT,
        match=Match(modalities=["CR", "DX"], body_parts=["CHEST"]),
    ),
]  # fmt: skip


def test_first_matching_rule_decides() -> None:
    decision = route(RULES, summary())
    assert decision.rule is RULES[0]
    assert [(j.model, j.priority, j.rule) for j in decision.jobs] == [
        ("ct-head-hyperdensity", Priority.STAT, "p/ed-head")
    ]
    ward = route(RULES, summary(calling_ae_titles=frozenset({"WARD_CT"})))
    assert ward.rule is RULES[1]
    assert ward.jobs[0].priority == Priority.ROUTINE


def test_no_rule_no_jobs() -> None:
    decision = route(RULES, summary(modalities=frozenset({"MR"})))
    assert decision.rule is None
    assert decision.jobs == []


def test_models_outside_their_intended_use_are_refused_and_third_party_deidentified() -> None:
    decision = route(RULES, summary(modalities=frozenset({"DX"}), body_parts=frozenset({"CHEST"})))
    assert [j.model for j in decision.jobs] == ["chest-xray-triage"]
    assert decision.jobs[0].deidentify is True
    assert decision.refused == ["ct-head-hyperdensity"]


@pytest.mark.parametrize(
    ("pattern", "description", "expected"),
    [
        ("*HEAD*", "ct head wo contrast", True),
        ("CT?HEAD", "CT HEAD", True),
        ("CT?HEAD", "CT  HEAD", False),
        ("CHEST", "CHEST PA", False),
        ("a.b*", "axb", False),
        ("[ab]", "a", False),
    ],
)
def test_study_description_wildcards(pattern: str, description: str, expected: bool) -> None:
    match = Match(study_description=pattern)
    assert matches(match, summary(description=description)) is expected


@pytest.mark.parametrize(
    ("sop_class", "reopens"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),  # CT Image
        ("1.2.840.10008.5.1.4.1.1.77.1.6", True),  # VL Whole Slide Microscopy Image
        ("1.2.840.10008.5.1.4.1.1.3.1", True),  # Ultrasound Multi-frame Image
        ("1.2.840.10008.5.1.4.1.1.88.11", False),  # Basic Text SR
        ("1.2.840.10008.5.1.4.1.1.88.34", False),  # Comprehensive 3D SR
        ("1.2.840.10008.5.1.4.1.1.88.59", False),  # Key Object Selection
        ("1.2.840.10008.5.1.4.1.1.11.1", False),  # Grayscale Softcopy Presentation State
        ("1.2.840.10008.5.1.4.1.1.66.4", False),  # Segmentation
        ("1.2.840.10008.5.1.4.1.1.104.1", False),  # Encapsulated PDF
    ],
)
def test_what_a_reader_saves_reopens_a_study_only_when_a_rule_asks_for_it(
    sop_class: str, reopens: bool
) -> None:
    assert reopens_study([], sop_class) is reopens
    asks = CompiledRule(
        policy="p", name="r", match=Match(sop_classes=[sop_class]), models=[CT_HEAD]
    )
    assert reopens_study([asks], sop_class) is True
