"""RoutingPolicies judged against the AIModels of their namespace, and compiled into the
ordered rules each site's gateway evaluates (the first matching rule wins)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from telerad.api.aimodel import AIModel
from telerad.api.config import CompiledRule, ModelRoute
from telerad.api.routing import Match, RoutingPolicy, RoutingRule
from telerad.api.types import LabelSelector


@dataclass(frozen=True)
class Verdict:
    """What the operator concludes about one policy."""

    missing: list[str] = field(default_factory=list)
    """Rules naming models that do not exist."""
    uncovered: list[str] = field(default_factory=list)
    """Rules sending studies outside a model's intended use."""
    warnings: list[str] = field(default_factory=list)
    """Rules that can never match."""

    @property
    def resolved(self) -> bool:
        return not self.missing

    @property
    def accepted(self) -> bool:
        return not self.missing and not self.uncovered


def _outside(rule: RoutingRule, model: AIModel) -> str | None:
    """Why the rule sends the model studies outside its intended use, if it does."""
    use = model.spec.intended_use
    subject = f"rule {rule.name!r}"
    target = f"AIModel {model.metadata.name!r}"
    # (what, the rule's values, the model's values, whether "any" is too broad). A rule
    # without SOP classes is fine: the gateway gives a model only instances of the SOP
    # classes it reads.
    dimensions = (
        ("modality", rule.match.modalities, use.modalities, True),
        ("body part", rule.match.body_parts, use.body_parts, True),
        ("SOP class", rule.match.sop_classes, use.sop_classes, False),
    )
    for what, wanted, allowed, strict in dimensions:
        if not allowed:
            continue
        if not wanted:
            if strict:
                only = ", ".join(map(str, allowed))
                return f"{subject} matches every {what}, but {target} is intended for {only} only"
            continue
        extra = sorted(set(map(str, wanted)) - set(map(str, allowed)))
        if extra:
            sent = ", ".join(extra)
            return f"{subject} sends {what} {sent} to {target}, which is not intended for it"
    return None


def _covers(earlier: Match, later: Match) -> bool:
    """Whether every study ``later`` matches is matched by ``earlier`` too."""

    def within(a: Sequence[str], b: Sequence[str]) -> bool:
        return not a or (bool(b) and set(b) <= set(a))

    return (
        within(earlier.modalities, later.modalities)
        and within(earlier.body_parts, later.body_parts)
        and within(earlier.sop_classes, later.sop_classes)
        and within(earlier.calling_ae_titles, later.calling_ae_titles)
        and earlier.study_description in (None, "*", later.study_description)
    )


def evaluate(policy: RoutingPolicy, models: Mapping[str, AIModel]) -> Verdict:
    verdict = Verdict()
    rules = policy.spec.rules
    for rule in rules:
        for model_name in rule.models:
            model = models.get(model_name)
            if model is None:
                verdict.missing.append(
                    f"rule {rule.name!r} names AIModel {model_name!r}, "
                    "which does not exist in this namespace"
                )
            elif (problem := _outside(rule, model)) is not None:
                verdict.uncovered.append(problem)
    for i, later in enumerate(rules):
        shadow = next((e for e in rules[:i] if _covers(e.match, later.match)), None)
        if shadow is not None:
            verdict.warnings.append(
                f"rule {later.name!r} can never match: "
                f"the earlier rule {shadow.name!r} takes every study it would"
            )
    return verdict


def _selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for expr in selector.match_expressions:
        present = expr.key in labels
        value = labels.get(expr.key)
        ok = {
            "In": present and value in expr.values,
            "NotIn": not present or value not in expr.values,
            "Exists": present,
            "DoesNotExist": not present,
        }[expr.operator]
        if not ok:
            return False
    return True


def selects(policy: RoutingPolicy, site: str, labels: Mapping[str, str]) -> bool:
    sites = policy.spec.sites
    if sites.names is not None:
        return site in sites.names
    return sites.selector is not None and _selector_matches(sites.selector, labels)


def compile_rules(
    site: str,
    labels: Mapping[str, str],
    policies: Iterable[RoutingPolicy],
    models: Mapping[str, AIModel],
) -> list[CompiledRule]:
    """The rules of every accepted policy that selects the site, policies in name order
    and rules in their written order. A refused policy contributes nothing."""
    compiled = []
    for policy in sorted(policies, key=lambda p: p.metadata.name):
        if not selects(policy, site, labels) or not evaluate(policy, models).accepted:
            continue
        for rule in policy.spec.rules:
            routes = [
                ModelRoute(
                    name=m,
                    third_party=models[m].spec.third_party,
                    intended_use=models[m].spec.intended_use,
                    thresholds=models[m].spec.thresholds,
                )
                for m in rule.models
            ]
            compiled.append(
                CompiledRule(
                    policy=policy.metadata.name,
                    name=rule.name,
                    match=rule.match,
                    models=routes,
                    priority=rule.priority,
                    # A third-party model only ever sees de-identified data.
                    deidentify=rule.deidentify or any(r.third_party for r in routes),
                    notify=rule.notify,
                )
            )
    return compiled
