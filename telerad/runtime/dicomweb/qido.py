"""QIDO-RS (PS3.18 10.6) apart from HTTP: query parameters to a catalog `Search`, and
its rows to DICOM JSON.

Matching follows PS3.4 C.2.2.2: single value, universal (an empty value returns the
attribute), wildcards `*` and `?` on text, UID lists (`,` or `\\` between UIDs), and
ranges on dates and times. Person names match case-insensitively (as most PACS do), the
rest case-sensitively. Fuzzy matching is not supported: literal matching is done and a
warning says so. Anything we cannot match is a `QueryError` naming the parameter, never a
silently broader search.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.datadict import keyword_dict, keyword_for_tag, tag_for_keyword

from telerad.runtime.dataset import valid_uid
from telerad.runtime.store.catalog import (
    ATTRIBUTES,
    Kind,
    Level,
    Match,
    Search,
    SearchResult,
)
from telerad.runtime.store.query import keywords

__all__ = [
    "MATCHING_KEYS",
    "MAX_COUNT",
    "TEXT_PATTERN",
    "VALUE_PATTERNS",
    "Level",
    "Query",
    "QueryError",
    "parse",
    "result_warnings",
    "results",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_UID = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+"
_DATE = r"[0-9]{8}"
_TIME = r"[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?"
_NUMBER = re.compile(r"[0-9]{1,9}")
_TEXT_MAX = 256
# What a matching value of each VR may look like (empty: universal matching), for the
# OpenAPI description; the parser below says what is wrong with anything else.
VALUE_PATTERNS: Final[dict[str, str]] = {
    "UI": rf"^({_UID}([,\\]{_UID})*)?$",
    "DA": rf"^({_DATE}|{_DATE}-({_DATE})?|-{_DATE})?$",
    "TM": rf"^({_TIME}|{_TIME}-({_TIME})?|-{_TIME})?$",
    "US": r"^([0-9]{1,9})?$",
    "IS": r"^([0-9]{1,9})?$",
}
TEXT_PATTERN: Final = r"^[^\\]*$"
MAX_COUNT: Final = 999_999_999
# What a search returns by default (PS3.18 table 10.6.3-3..5), before includefield.
_DEFAULTS: Final[dict[Level, tuple[str, ...]]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.INSTANCE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
MATCHING_KEYS: Final[dict[Level, list[str]]] = {
    level: [k for k in keywords(level) if ATTRIBUTES[k].matchable] for level in Level
}


class QueryError(ValueError):
    """The query cannot be run as asked; the message names the parameter."""


@dataclass
class Query:
    search: Search
    returned: list[str]
    """Keywords each result carries."""
    warnings: list[str] = field(default_factory=list)
    """Texts for `Warning: 299` headers."""


def _keyword(key: str) -> str:
    """A query key as a keyword: by keyword or as eight hex digits."""
    if "." in key:
        raise QueryError(f"{key}: attributes inside sequences cannot be matched")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        # keyword_for_tag, unlike dictionary_keyword, answers "" for a tag it does not know.
        name = keyword_for_tag(int(key, 16))
        if not name:
            raise QueryError(f"{key}: not a known attribute tag")
        return str(name)
    if key not in keyword_dict:
        raise QueryError(f"{key}: not a known attribute keyword or tag")
    return key


def _match(keyword: str, value: str) -> Match:
    vr = ATTRIBUTES[keyword].vr
    if vr == "UI":
        # Only the syntax is checked: a UID longer than 64 characters matches nothing.
        uids = tuple(re.split(r"[,\\]", value))
        bad = [u for u in uids if not re.fullmatch(_UID, u)]
        if bad:
            raise QueryError(f"{keyword}: {bad[0][:80]!r} is not a UID")
        return Match(keyword, Kind.ANY_OF if len(uids) > 1 else Kind.EXACT, uids)
    if len(value) > _TEXT_MAX:
        raise QueryError(f"{keyword}: the value is longer than {_TEXT_MAX} characters")
    if vr in ("DA", "TM"):
        if not re.fullmatch(VALUE_PATTERNS[vr], value):
            what = "YYYYMMDD" if vr == "DA" else "HHMMSS"
            raise QueryError(f"{keyword}: {value!r} is not a {what} value or range")
        low, dash, high = value.partition("-")
        if not dash:
            return Match(keyword, Kind.EXACT, (value,))
        return Match(keyword, Kind.RANGE, (low, high))
    if vr in ("US", "IS"):
        if not _NUMBER.fullmatch(value):
            raise QueryError(f"{keyword}: {value!r} is not a number")
        return Match(keyword, Kind.EXACT, (str(int(value)),))
    if "\\" in value:
        raise QueryError(f"{keyword}: value lists are only supported for UIDs")
    kind = Kind.WILDCARD if "*" in value or "?" in value else Kind.EXACT
    return Match(keyword, kind, (value,))


def _count(params: Sequence[tuple[str, str]], name: str, default: int) -> int:
    values = [v for k, v in params if k == name]
    if not values:
        return default
    if len(values) > 1 or not _NUMBER.fullmatch(values[0]):
        raise QueryError(f"{name} must be one whole number from 0 to {MAX_COUNT}")
    return int(values[0])


def _include(
    params: Sequence[tuple[str, str]],
    available: list[str],
    returned: list[str],
    warnings: list[str],
) -> None:
    """Add what `includefield` asks for to `returned`."""
    for raw in (v for k, v in params if k == "includefield"):
        for field_name in (f.strip() for f in raw.split(",") if f.strip()):
            if field_name == "all":
                returned.extend(k for k in available if k not in returned)
                continue
            try:
                keyword = _keyword(field_name)
            except QueryError:
                warnings.append(f"includefield {field_name[:64]} is not an attribute; ignored")
                continue
            if keyword not in available:
                warnings.append(f"includefield {keyword} is not held by this server; ignored")
            elif keyword not in returned:
                returned.append(keyword)


def parse(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Query:
    """The search a QIDO-RS request asks for, scoped to the study/series in its path."""
    for name, value in (("study", study_uid), ("series", series_uid)):
        if value is not None and not valid_uid(value):
            raise QueryError(f"the {name} in the path is not a valid UID")
    warnings: list[str] = []
    available = keywords(level)
    returned = [k for lvl in Level if lvl <= level for k in _DEFAULTS[lvl]]
    matches: list[Match] = []
    for key, value in params:
        if key in _CONTROL:
            continue
        keyword = _keyword(key)
        if keyword not in available or not ATTRIBUTES[keyword].matchable:
            supported = ", ".join(MATCHING_KEYS[level])
            named = key if key == keyword else f"{key} ({keyword})"
            raise QueryError(f"{named}: not a supported matching key here; use {supported}")
        if keyword not in returned:
            returned.append(keyword)
        if value != "":
            matches.append(_match(keyword, value))
    _include(params, available, returned, warnings)
    fuzzy = [v.lower() for k, v in params if k == "fuzzymatching"]
    if any(v not in ("true", "false") for v in fuzzy):
        raise QueryError("fuzzymatching must be true or false")
    if "true" in fuzzy:
        warnings.append("fuzzymatching is not supported; literal matching was performed")
    limit = _count(params, "limit", DEFAULT_LIMIT)
    if limit > MAX_LIMIT:
        warnings.append(f"limit {limit} exceeds the maximum; {MAX_LIMIT} results at most")
        limit = MAX_LIMIT
    offset = _count(params, "offset", 0)
    search = Search(
        level=level,
        matches=tuple(matches),
        study_uid=study_uid,
        series_uid=series_uid,
        limit=limit,
        offset=offset,
    )
    return Query(search=search, returned=returned, warnings=warnings)


def result_warnings(query: Query, result: SearchResult) -> list[str]:
    if not result.more:
        return []
    after = query.search.offset + query.search.limit
    return [f"there are more results than the limit; ask again with offset={after}"]


def _value(vr: str, value: str | int | None) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    if vr in ("US", "IS"):
        try:
            return {"vr": vr, "Value": [int(value)]}
        except ValueError:
            return {"vr": vr}
    if isinstance(value, str) and "\\" in value:
        return {"vr": vr, "Value": value.split("\\")}
    return {"vr": vr, "Value": [str(value)]}


def results(query: Query, result: SearchResult, base_url: str) -> list[dict[str, Any]]:
    """Each row as a DICOM JSON object with the attributes asked for and its RetrieveURL."""
    level = query.search.level
    out = []
    for row in result.rows:
        item: dict[str, Any] = {}
        for keyword in query.returned:
            item[f"{tag_for_keyword(keyword):08X}"] = _value(
                ATTRIBUTES[keyword].vr, row.get(keyword)
            )
        url = f"{base_url}/studies/{row['StudyInstanceUID']}"
        if level >= Level.SERIES:
            url += f"/series/{row['SeriesInstanceUID']}"
        if level >= Level.INSTANCE:
            url += f"/instances/{row['SOPInstanceUID']}"
        item["00081190"] = {"vr": "UR", "Value": [url]}
        out.append(dict(sorted(item.items())))
    return out
