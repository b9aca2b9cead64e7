"""Routing a completed study: the first compiled rule that matches picks models and a
priority. Pure: the gateway calls it with what the catalog knows of the study."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from telerad.api.config import CompiledRule, ModelRoute
from telerad.api.routing import Match
from telerad.runtime.store.catalog import NewJob, StudySummary


@dataclass(frozen=True, slots=True)
class Decision:
    rule: CompiledRule | None
    jobs: list[NewJob] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Models the rule names whose intended use does not cover this study."""


@lru_cache(maxsize=256)
def _wildcard(pattern: str) -> re.Pattern[str]:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4): * any run, ? one character.

    Every run of text between two stars is taken at its first occurrence, in an atomic
    group: the leftmost place never leaves less for the rest of the pattern, and without
    the group the engine would try every other place too, which grows as the description
    length to the power of the number of stars (`*a*a*a*a*a*a*a*a*a*a*b` took 25 s on a
    40-character description; 32 stars never finish)."""

    def text(run: str) -> str:
        return "".join("." if c == "?" else re.escape(c) for c in run)

    head, *rest = pattern.split("*")
    if not rest:
        return re.compile(text(head), re.IGNORECASE | re.DOTALL)
    *middle, tail = rest
    regex = text(head) + "".join(f"(?>.*?{text(run)})" for run in middle) + ".*" + text(tail)
    return re.compile(regex, re.IGNORECASE | re.DOTALL)


def matches(match: Match, study: StudySummary) -> bool:
    def any_of(wanted: list[str], present: frozenset[str]) -> bool:
        return not wanted or not present.isdisjoint(wanted)

    return (
        any_of([str(m) for m in match.modalities], study.modalities)
        and any_of([b.upper() for b in match.body_parts], study.body_parts)
        and any_of(match.sop_classes, study.sop_classes)
        and any_of(match.calling_ae_titles, study.calling_ae_titles)
        and (
            match.study_description is None
            or _wildcard(match.study_description).fullmatch(study.description) is not None
        )
    )


def covers(model: ModelRoute, study: StudySummary) -> bool:
    """The model's intended use admits the study: a route outside it is refused."""
    use = model.intended_use
    return (
        not study.modalities.isdisjoint(str(m) for m in use.modalities)
        and (
            not use.body_parts or not study.body_parts.isdisjoint(b.upper() for b in use.body_parts)
        )
        and (not use.sop_classes or not study.sop_classes.isdisjoint(use.sop_classes))
    )


# SOP class families that readers and post-processing make about images, rather than
# images: structured reports and key objects (88), presentation states (11),
# segmentations and registrations (66), encapsulated documents (104).
_NOT_IMAGES = tuple(f"1.2.840.10008.5.1.4.1.1.{family}." for family in ("88", "11", "66", "104"))


def reopens_study(rules: Sequence[CompiledRule], sop_class_uid: str) -> bool:
    """Whether an instance of this class, arriving in a completed study, makes the study
    route again: an image does (a late or re-sent slice); a report, key object,
    presentation state or segmentation saved from a viewer does only when some rule asks
    for its class, or every report a reader saves would run the models again."""
    is_image = not sop_class_uid.startswith(_NOT_IMAGES)
    return is_image or any(sop_class_uid in rule.match.sop_classes for rule in rules)


def route(rules: list[CompiledRule], study: StudySummary) -> Decision:
    for rule in rules:
        if not matches(rule.match, study):
            continue
        jobs, refused = [], []
        for model in rule.models:
            if not covers(model, study):
                refused.append(model.name)
                continue
            jobs.append(
                NewJob(
                    model=model.name,
                    priority=rule.priority,
                    rule=f"{rule.policy}/{rule.name}",
                    deidentify=rule.deidentify or model.third_party,
                    notify=rule.notify,
                )
            )
        return Decision(rule=rule, jobs=jobs, refused=refused)
    return Decision(rule=None)
