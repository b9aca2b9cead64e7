"""Fuzzing of routing and of the config loaders, as rows of RELIABILITY.md.

Routing runs in the gateway on every completed study, with strings that come from
modalities over the network (descriptions, body parts, AE titles) and patterns a tenant
wrote in a RoutingPolicy: an exception or a hang there stops routing for the whole site.
The config loaders and the CRD models read what people write by hand: a mistake must come
back as a validation error naming the field, never as a traceback of some other exception.

Runs are derandomized so CI sees the same examples every time and stays bounded;
TELERAD_FUZZ_EXAMPLES=N raises every property to at least N examples for long recorded
runs (`bench/reliability.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args

import click
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from telerad.api.aimodel import AIModelSpec, InferenceServer, IntendedUse, ModelRef, Thresholds
from telerad.api.base import ApiModel
from telerad.api.config import (
    CompiledRule,
    GatewayConfig,
    GatewayEndpoint,
    ModelRoute,
    WorkerConfig,
)
from telerad.api.routing import Match, RoutingPolicySpec
from telerad.api.site import ImagingSiteSpec
from telerad.api.types import Modality, Priority
from telerad.cli import _load
from telerad.runtime.gateway.example import example_config
from telerad.runtime.routing import covers, matches, route
from telerad.runtime.store.catalog import StudySummary
from tests.api_examples import samples

_SCALE = int(os.environ.get("TELERAD_FUZZ_EXAMPLES", "0") or 0)


def budget(examples: int, *, fixture: bool = False) -> Callable[[Any], Any]:
    """Bounded, reproducible settings; no example database, so a run writes nothing."""
    return settings(
        max_examples=max(examples, _SCALE),
        deadline=None,
        derandomize=True,
        database=None,
        # tmp_path is only written over by each example, never relied on between them.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
        if fixture
        else [HealthCheck.too_slow],
    )


# --- strings -------------------------------------------------------------------------

GLOB = "*?[]\\"
REGEX = "().+^$|{}"
# Strings a modality or a hand-written policy may hold: metacharacters of both pattern
# languages, non-ASCII letters whose case folding is special, control characters.
HOSTILE_ALPHABET = "aAbB09 _-." + GLOB + REGEX + "\n\t\x00ßéÉ\u017f\u0131\u212a\u0130\U0001f600"
hostile = st.one_of(
    st.text(alphabet=HOSTILE_ALPHABET, max_size=40),
    st.text(max_size=40),  # any unicode, surrogates included
    # Long strings by repetition: cheap to generate, as long as a big data set holds.
    st.builds(
        operator.mul,
        st.text(alphabet=HOSTILE_ALPHABET, min_size=1, max_size=8),
        st.integers(30, 500),
    ),
)

# Small pools, so that generated studies and rules actually meet.
BODY_PARTS = ["HEAD", "BRAIN", "CHEST", "ABDOMEN", "HEAD_NECK"]
SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.1", "1.2.3"]
AE_TITLES = ["ED_CT01", "STM_DX02", "A*?", "  X", "(.+)|^$"]
DESCRIPTIONS = ["CT HEAD WO CONTRAST", "ct head", "CHEST PA", "a.c", "abc", "", "*", "?"]
MODEL_NAMES = ["ct-head", "cxr", "vendor-x", "m"]
modalities = st.sampled_from(list(Modality))


def pooled(pool: list[str], valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(pool), valid)


body_part = pooled(BODY_PARTS, st.from_regex(r"[A-Z0-9_]{1,16}", fullmatch=True))
sop_class = pooled(
    SOP_CLASSES, st.from_regex(r"(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,6}", fullmatch=True)
)
ae_title = pooled(AE_TITLES, st.from_regex(r" {0,3}[!-\[\]-~][ -\[\]-~]{0,12}", fullmatch=True))
# Study description patterns: wildcards mixed with regex metacharacters and unicode.
pattern = st.one_of(
    st.sampled_from(["*", "?", "*HEAD*", "CT?HEAD", "a.c", "[ab]", "(a|b)", "a+", "\\d", "^a$"]),
    st.text(alphabet="ab*?" + REGEX + "[]\\", min_size=1, max_size=64),
    st.text(min_size=1, max_size=64),
)


# --- routing -------------------------------------------------------------------------


def small_set(item: st.SearchStrategy[str], hostile_too: bool = True) -> Any:
    items = st.one_of(item, hostile) if hostile_too else item
    return st.frozensets(items, max_size=4)


@st.composite
def studies(draw: st.DrawFn) -> StudySummary:
    return StudySummary(
        study_uid=draw(st.sampled_from(["1.2.3", "", "x" * 300])),
        round=draw(st.integers(0, 3)),
        # The catalog passes on whatever a data set held, valid code or not.
        modalities=draw(small_set(modalities.map(str))),
        body_parts=draw(small_set(body_part)),
        sop_classes=draw(small_set(sop_class)),
        calling_ae_titles=draw(small_set(ae_title)),
        description=draw(st.one_of(st.sampled_from(DESCRIPTIONS), hostile)),
        instances=draw(st.integers(0, 10_000)),
        first_received=draw(st.floats(allow_nan=True)),
    )


def unique(item: st.SearchStrategy[Any], max_size: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(item, max_size=max_size, unique=True)


@st.composite
def match_fields(draw: st.DrawFn) -> Match:
    return Match(
        modalities=draw(unique(modalities, 3)),
        body_parts=draw(unique(body_part, 3)),
        sop_classes=draw(unique(sop_class, 2)),
        calling_ae_titles=draw(unique(ae_title, 2)),
        study_description=draw(st.none() | pattern),
    )


@st.composite
def model_routes(draw: st.DrawFn) -> ModelRoute:
    return ModelRoute(
        name=draw(st.sampled_from(MODEL_NAMES)),
        third_party=draw(st.booleans()),
        intended_use=IntendedUse(
            modalities=draw(unique(modalities, 3).filter(bool)),
            body_parts=draw(unique(body_part, 3)),
            sop_classes=draw(unique(sop_class, 2)),
        ),
    )


@st.composite
def compiled_rules(draw: st.DrawFn) -> CompiledRule:
    return CompiledRule(
        policy=draw(st.sampled_from(["p", "q"])),
        name=draw(st.sampled_from(["r1", "r2", "r3"])),
        match=draw(match_fields()),
        models=draw(st.lists(model_routes(), min_size=1, max_size=3)),
        priority=draw(st.sampled_from(list(Priority))),
        deidentify=draw(st.booleans()),
        notify=draw(st.booleans()),
    )


def aimed_at(match: Match, model: ModelRoute, extra: StudySummary) -> StudySummary:
    """A study with one value of every field the match sets (a description equal to the
    pattern, which a pattern always matches) and a modality the model reads, plus
    whatever else `extra` holds."""
    return dataclasses.replace(
        extra,
        modalities=frozenset(str(m) for m in match.modalities[:1])
        | {str(model.intended_use.modalities[0])}
        | extra.modalities,
        body_parts=frozenset(match.body_parts[:1]) | extra.body_parts,
        sop_classes=frozenset(match.sop_classes[:1]) | extra.sop_classes,
        calling_ae_titles=frozenset(match.calling_ae_titles[:1]) | extra.calling_ae_titles,
        description=match.study_description or extra.description,
    )


@st.composite
def routing_cases(draw: st.DrawFn) -> tuple[list[CompiledRule], StudySummary]:
    rules = draw(st.lists(compiled_rules(), max_size=6))
    study = draw(studies())
    # Random studies rarely meet random rules: most cases aim at one rule, so that the
    # first-match and intended-use checks below run, not only the no-match branch.
    aim = draw(st.integers(0, 3))
    if rules and aim:
        rule = draw(st.sampled_from(rules))
        study = aimed_at(rule.match, draw(st.sampled_from(rule.models)), study)
    return rules, study


@pytest.mark.reliability("fuzz", "routing rules and studies with hostile strings")
@budget(200)
@given(case=routing_cases())
def test_route_is_total_deterministic_and_takes_the_first_matching_rule(
    case: tuple[list[CompiledRule], StudySummary],
) -> None:
    rules, study = case
    with cpu_bound(10):
        decision = route(rules, study)
    # Same answer again, and from equal rules that are other objects (no state kept).
    assert route(rules, study) == decision
    assert route(copy.deepcopy(rules), study) == decision

    first = next((r for r in rules if matches(r.match, study)), None)
    event("no rule matched" if first is None else f"rule {rules.index(first)} matched")
    if first is None:
        assert decision.rule is None
        assert decision.jobs == [] and decision.refused == []
        return
    assert decision.rule is first
    # Every model of the rule gets a job or is refused, in order, never both, never
    # a model of another rule.
    jobs = iter(decision.jobs)
    refused = iter(decision.refused)
    for model in first.models:
        if covers(model, study):
            job = next(jobs)
            assert job.model == model.name
            assert job.priority == first.priority
            assert job.rule == f"{first.policy}/{first.name}"
            assert job.deidentify == (first.deidentify or model.third_party)
            assert job.notify == first.notify
            # Intended use: the study has a modality the model reads.
            assert not study.modalities.isdisjoint(str(m) for m in model.intended_use.modalities)
        else:
            assert next(refused) == model.name
    assert next(jobs, None) is None and next(refused, None) is None
    event(f"{len(decision.jobs)} jobs, {len(decision.refused)} refused")


@pytest.mark.reliability("fuzz", "routing match fields: empty, supersets, hostile values")
@budget(150)
@given(match=match_fields(), model=model_routes(), study=studies(), extra=studies())
def test_match_is_any_of_per_field_and_every_field_must_hold(
    match: Match, model: ModelRoute, study: StudySummary, extra: StudySummary
) -> None:
    assert matches(Match(), study), "an empty match takes every study"
    # A study with a value of every field the match sets is taken.
    assert matches(match, aimed_at(match, model, extra))
    # More values in the study never lose a match (any-of), and a study lacking every
    # value of a set field is never taken.
    if matches(match, study):
        grown = dataclasses.replace(
            study,
            modalities=study.modalities | extra.modalities,
            body_parts=study.body_parts | extra.body_parts,
            sop_classes=study.sop_classes | extra.sop_classes,
            calling_ae_titles=study.calling_ae_titles | extra.calling_ae_titles,
        )
        assert matches(match, grown)
    if match.modalities and study.modalities.isdisjoint(str(m) for m in match.modalities):
        assert not matches(match, study)
    if match.calling_ae_titles and study.calling_ae_titles.isdisjoint(match.calling_ae_titles):
        assert not matches(match, study)


@lru_cache(maxsize=4096)
def _same_letter(p: str, d: str) -> bool:
    # Case folding as the documented case-insensitive comparison does it, one character
    # against one: the reference below is about wildcards, not about Unicode casing.
    return re.fullmatch(re.escape(p), d, re.IGNORECASE) is not None


def glob_reference(pattern: str, text: str) -> bool:
    """DICOM wildcard matching by dynamic programming: * any run, ? one character,
    every other character itself (case-insensitive)."""
    # can[j]: pattern[:i] matches text[:j]
    can = [True] + [False] * len(text)
    for p in pattern:
        if p == "*":
            for j in range(1, len(text) + 1):
                can[j] = can[j] or can[j - 1]
        else:
            can = [False] + [
                can[j] and (p == "?" or _same_letter(p, text[j])) for j in range(len(text))
            ]
    return can[-1]


class Hang(Exception):
    """Far more CPU spent on one input than any input needs."""


@contextmanager
def cpu_bound(seconds: float) -> Iterator[None]:
    """A hang guard, not a speed check (microseconds are expected). CPU time, so a busy
    machine does not trip it, and SIGVTALRM, so pytest-timeout's SIGALRM is left alone;
    an exception rather than pytest-timeout also lets hypothesis go on to its next
    example and report every one that hangs."""

    def hang(signum: int, frame: object) -> None:
        raise Hang(f"still working after {seconds} s of CPU")

    previous = signal.signal(signal.SIGVTALRM, hang)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def described(text: str) -> StudySummary:
    empty: frozenset[str] = frozenset()
    return StudySummary("1", 0, empty, empty, empty, empty, text, 1, 0.0)


@pytest.mark.reliability(
    "fuzz", "study description wildcards with regex metacharacters, against a reference"
)
@budget(500)
@given(pattern=pattern, text=st.one_of(st.sampled_from(DESCRIPTIONS), hostile, pattern))
@example(pattern="a.c", text="abc")  # . is a character, not "any"
@example(pattern="a.c", text="a.c")
@example(pattern="(a|b)", text="a")
@example(pattern="a+", text="aa")
@example(pattern="^a$", text="^a$")
@example(pattern="\\d", text="1")
@example(pattern="a{2}", text="aa")
@example(pattern="[ab]", text="a")
@example(pattern="*\n*", text="a\nb")  # * runs over line breaks
@example(pattern="ß", text="SS")  # one character never matches two
# Regression: each star was a backtracking `.*`, so this policy pattern (valid: 64
# characters) against a 64-character description never finished and stopped routing.
@example(pattern="*a" * 31 + "*b", text="a" * 64)
@example(pattern="*a*a*a*a*a*a*a*a*a*a*b", text="a" * 2000)
def test_description_patterns_are_dicom_wildcards_never_regexes(pattern: str, text: str) -> None:
    match = Match(study_description=pattern)
    with cpu_bound(10):
        taken = matches(match, described(text))
    event(f"pattern matched: {taken}")
    assert taken is glob_reference(pattern, text)
    # Every character of a pattern matches itself, so a pattern takes its own text.
    assert matches(match, described(pattern))


# --- config loaders ------------------------------------------------------------------


def _field_names(model: type[ApiModel], seen: set[type[ApiModel]] | None = None) -> set[str]:
    """Every wire name of a model and of the models inside it, so that random documents
    use real keys and get past the top level."""
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        stack: list[Any] = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, ApiModel):
                names |= _field_names(tp, seen)
            stack.extend(get_args(tp))
    return names


CONFIG_KEYS = sorted(
    _field_names(GatewayConfig)
    | _field_names(WorkerConfig)
    | _field_names(ImagingSiteSpec)
    | _field_names(AIModelSpec)
    | _field_names(RoutingPolicySpec)
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # nan and infinities included
    hostile,
    st.sampled_from(["", "0", "1.5", "CT", "HEAD", "stat", "http://x", "/data/x", "10.0.0.0/8"]),
)
keys = st.one_of(st.sampled_from(CONFIG_KEYS), hostile)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """The valid document with one to three random edits: a value replaced, a key
    deleted, a key added, anywhere in the tree."""
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        node: Any = doc
        # Walk down a random path, stopping at a random depth.
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(
                st.sampled_from(list(node.keys()) if isinstance(node, dict) else range(len(node)))
            )
            child = node[key]
            if not isinstance(child, (dict, list)) or not child:
                break
            node = child
        if not isinstance(node, (dict, list)) or not node:
            continue
        slot = draw(
            st.sampled_from(list(node.keys()) if isinstance(node, dict) else range(len(node)))
        )
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[slot] = draw(documents)
        elif action == "delete":
            del node[slot]
        elif isinstance(node, dict):
            node[draw(keys)] = draw(documents)
        else:
            node.append(draw(documents))
    return doc


def worker_example() -> WorkerConfig:
    # As telerad.runtime.worker.example builds it, without loading the model plugin.
    return WorkerConfig(
        model=ModelRef(name="ct-head-hyperdensity", version="1.0.0"),
        gateways=[
            GatewayEndpoint(
                site="example", url="http://127.0.0.1:8080", token_file=Path("/data/token")
            )
        ],
        thresholds=Thresholds(critical=0.8, findings={"bleed": 0.5}),
        lease_seconds=30,
        metrics_port=9090,
        bind_address="127.0.0.1",
        inference_server=InferenceServer(url="http://127.0.0.1:8000", model="cthead"),
    )


GATEWAY = example_config(11112, 8080, Path("/data")).to_wire()
WORKER = worker_example().to_wire()
CONFIGS: list[tuple[type[ApiModel], dict[str, Any]]] = [
    (GatewayConfig, GATEWAY),
    (WorkerConfig, WORKER),
]


def check_refusal(exc: ValidationError) -> None:
    """A refusal a person can act on: every error has a message, and the text the CLI
    prints names the field of each error."""
    errors = exc.errors()
    assert errors
    text = str(exc)
    for error in errors:
        assert error["msg"]
        # (pydantic quotes a key with a dot in it, so each part is looked for alone.)
        for part in error["loc"]:
            assert str(part) in text


def check_loaded(model: type[ApiModel], doc: Any) -> None:
    """Loading gives the model, which survives its own wire form, or a ValidationError;
    any other exception fails the test by propagating."""
    try:
        parsed = model.from_wire(doc)
    except ValidationError as exc:
        event("refused")
        check_refusal(exc)
    else:
        event("accepted")
        assert isinstance(parsed, model)
        # The wire form is a fixed point. (Not the object: a null in `metadata`, which
        # keeps unknown keys, is left out of the wire form, as the API server does.)
        wire = parsed.to_wire()
        assert model.from_wire(wire).to_wire() == wire


def test_the_examples_the_mutations_start_from_are_valid() -> None:
    for model, valid in CONFIGS:
        assert model.from_wire(valid).to_wire() == valid


# Keys YAML can give that no field has.
ODD_KEYS: dict[Any, Any] = {1: 2, None: 3, 1.5: [], "": {}}


@st.composite
def config_documents(draw: st.DrawFn) -> tuple[int, Any]:
    which = draw(st.sampled_from(range(len(CONFIGS))))
    return which, draw(st.one_of(documents, mutated(CONFIGS[which][1])))


@pytest.mark.reliability("fuzz", "gateway and worker configs: random and mutated documents")
@budget(300)
@given(case=config_documents())
# Values a strict reading must refuse by field, not trip over.
@example(case=(0, {**GATEWAY, "dicomPort": math.nan}))
@example(case=(0, {**GATEWAY, "httpPort": 10**400}))
@example(case=(0, {**GATEWAY, "storage": {"hotDir": None}}))
@example(case=(0, {**GATEWAY, "routing": [{"match": {"studyDescription": 3}}]}))
@example(case=(0, {**GATEWAY, "allowedCallers": [[]]}))
@example(case=(1, {**WORKER, **ODD_KEYS}))
@example(case=(1, {**WORKER, "pollSeconds": math.inf}))
def test_config_documents_load_or_are_refused_by_field(case: tuple[int, Any]) -> None:
    which, doc = case
    check_loaded(CONFIGS[which][0], doc)


def _rendered(which: int) -> bytes:
    return yaml.safe_dump(CONFIGS[which][1], sort_keys=False).encode()


@st.composite
def config_files(draw: st.DrawFn) -> tuple[int, bytes]:
    which = draw(st.sampled_from(range(len(CONFIGS))))
    kind = draw(st.sampled_from(["document", "text", "bytes"]))
    if kind == "document":
        doc = draw(st.one_of(documents, mutated(CONFIGS[which][1])))
        return which, yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()
    if kind == "text":
        # Characters cut out of, or put into, the rendered YAML: broken indentation,
        # unclosed quotes and brackets, stray tabs, anchors, aliases and tags.
        text = _rendered(which)
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        put = draw(st.one_of(st.text(alphabet=":-[]{}'\"&*!|>#%@`\t\n ,?", max_size=8), hostile))
        return which, text[:at] + put.encode("utf-8", "surrogatepass") + text[at + cut :]
    return which, draw(st.binary(max_size=400))


@pytest.mark.reliability(
    "fuzz", "gateway and worker config files: mutated yaml text, bytes, deep nesting"
)
@budget(150, fixture=True)
@given(case=config_files())
# Regressions: the loader let these escape as RecursionError (PyYAML composes nested
# nodes recursively) and UnicodeDecodeError, which the CLI printed as tracebacks.
@example(case=(0, b"site: " + b"[" * 5000 + b"]" * 5000))
@example(case=(1, b"model: {name: " + b"{a: " * 3000 + b"}" * 3001))
@example(case=(0, _rendered(0).replace(b"example", b"ex\xffmple")))
@example(case=(1, b"\xff\xff\xff"))
def test_config_files_load_or_are_refused_with_the_file_named(
    tmp_path: Path, case: tuple[int, bytes]
) -> None:
    which, content = case
    model = CONFIGS[which][0]
    path = tmp_path / "config.yaml"
    path.write_bytes(content)

    # The loader itself: the model, or one of the two errors the CLI reports.
    try:
        loaded = model.load(path)
    except ValidationError as exc:
        check_refusal(exc)
    except yaml.YAMLError:
        event("not yaml")
    else:
        assert isinstance(loaded, model)
    # The CLI's reading of --config: the model or a one-line error naming the file.
    refused: click.ClickException | None = None
    try:
        config = _load(model, path, verbose=False)
    except click.ClickException as exc:
        refused = exc
    if refused is None:
        assert isinstance(config, model)
    else:
        assert refused.format_message().startswith(f"{path}: ")


SAMPLES = samples()


@pytest.mark.reliability(
    "fuzz", "imagingsite, aimodel and routingpolicy: random and mutated samples"
)
@budget(300)
@given(
    data=st.data(),
    which=st.sampled_from(range(len(SAMPLES))),
    part=st.sampled_from(["object", "spec"]),
)
def test_crd_objects_and_specs_are_accepted_or_refused_by_field(
    data: st.DataObject, which: int, part: str
) -> None:
    sample = SAMPLES[which]
    specs: dict[str, type[ApiModel]] = {
        "ImagingSite": ImagingSiteSpec,
        "AIModel": AIModelSpec,
        "RoutingPolicy": RoutingPolicySpec,
    }
    if part == "object":
        model, valid = sample.model, sample.obj
    else:
        model, valid = specs[sample.obj["kind"]], sample.obj["spec"]
    doc = data.draw(st.one_of(mutated(valid), documents))
    check_loaded(model, doc)
