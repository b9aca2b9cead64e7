"""QIDO-RS (PS3.18 10.6) apart from HTTP: query parameters to a catalog `Search`, and
its rows to DICOM JSON.

Matching follows PS3.4 C.2.2.2: single value, universal (an empty value returns the
attribute), wildcards `*` and `?` on text, and ranges on dates and times. Person names
match case-insensitively (as most PACS do), the rest case-sensitively.

Value lists: PS3.18 8.3.4.1 lets a UID key carry a comma-separated list (`1#value`), and
repeating a UID key adds to its list; PS3.4 C.2.2.2.2 writes the same list with `\\`.
Lists of other values are used by viewers (`ModalitiesInStudy=CT,MR`) and answered by
Orthanc and dcm4chee as "any of"; this server does the same for text and numbers (each
value may hold wildcards), with `,` or `\\` between values. PS3.4 C.2.2.2.8's "all of"
reading of `\\` applies only under Multiple Value Matching, which is not supported:
`multiplevaluematching=true` is answered with the Warning PS3.18 8.3.4.6 prescribes, as
are `fuzzymatching=true` and `emptyvaluematching=true`. Dates and times take ranges, not
lists.

Query parameters that are neither PS3.18 search parameters nor attributes (another
server's extensions, a cache buster) are ignored with a Warning, as PS3.18 asks. An
attribute that cannot be matched here, or a malformed value, is a `QueryError` naming the
parameter: ignoring it would silently widen the search.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.datadict import keyword_dict, keyword_for_tag, tag_for_keyword

from telerad.runtime.dataset import valid_uid
from telerad.runtime.store.search import (
    ATTRIBUTES,
    Kind,
    Level,
    Match,
    Search,
    SearchResult,
    keywords,
)

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
# PS3.18 8.3.4.2, 8.3.4.5 and 8.3.4.6: the text of the Warning each prescribes when asked
# for and not supported.
_NOT_SUPPORTED: Final = {
    "fuzzymatching": "The fuzzymatching parameter is not supported."
    " Only literal matching has been performed.",
    "emptyvaluematching": "The emptyvaluematching parameter is not supported."
    " Empty Value Matching has not been performed.",
    "multiplevaluematching": "The multiplevaluematching parameter is not supported."
    " Multiple Value Matching has not been performed.",
}
_CONTROL = frozenset({"limit", "offset", "includefield", *_NOT_SUPPORTED})
_LIST = re.compile(r"[,\\]")
_NAME_SHOWN = 64
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
    "US": r"^([0-9]{1,9}([,\\][0-9]{1,9})*)?$",
    "IS": r"^([0-9]{1,9}([,\\][0-9]{1,9})*)?$",
}
# Text: any value list whose values are not empty.
TEXT_PATTERN: Final = r"^([^,\\]+([,\\][^,\\]+)*)?$"
MAX_COUNT: Final = 999_999_999
# What a search returns by default (PS3.18 table 10.6.3-3..5), before includefield.
_DEFAULTS: Final[dict[Level, tuple[str, ...]]] = {
    Level.STUDY: (
        # PS3.18 table 10.6.3-3; left out of a result whose instances have none.
        "SpecificCharacterSet",
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
_WHEN_PRESENT: Final = frozenset({"SpecificCharacterSet"})
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


def _keyword(key: str) -> str | None:
    """A query key as a keyword: by keyword or as eight hex digits; None for a key that
    names no attribute at all (not a parameter of this server)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        # keyword_for_tag, unlike dictionary_keyword, answers "" for a tag it does not know.
        name = keyword_for_tag(int(key, 16))
        if not name:
            raise QueryError(f"{key}: not a known attribute tag")
        return str(name)
    if "." in key:
        path = key.split(".")
        if all(p in keyword_dict or re.fullmatch(r"[0-9A-Fa-f]{8}", p) for p in path):
            raise QueryError(f"{key}: attributes inside sequences cannot be matched")
        return None
    return key if key in keyword_dict else None


def _match(keyword: str, value: str) -> Match:
    """One key's match: a single value, or a value list (any of them)."""
    values = _LIST.split(value)
    if len(values) == 1:
        return _single(keyword, value)
    vr = ATTRIBUTES[keyword].vr
    if vr in ("DA", "TM"):
        raise QueryError(f"{keyword}: dates and times take a range (a-b), not a value list")
    if len(value) > _TEXT_MAX and vr != "UI":
        raise QueryError(f"{keyword}: the value is longer than {_TEXT_MAX} characters")
    if "" in values:
        raise QueryError(f"{keyword}: {value[:80]!r} has an empty value in its list")
    return Match(keyword, Kind.ANY_OF, tuple(_single(keyword, v).values[0] for v in values))


def _single(keyword: str, value: str) -> Match:
    vr = ATTRIBUTES[keyword].vr
    if vr == "UI":
        # Only the syntax is checked: a UID longer than 64 characters matches nothing.
        if not re.fullmatch(_UID, value):
            raise QueryError(f"{keyword}: {value[:80]!r} is not a UID")
        return Match(keyword, Kind.EXACT, (value,))
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
    kind = Kind.WILDCARD if "*" in value or "?" in value else Kind.EXACT
    return Match(keyword, kind, (value,))


def _flags(params: Sequence[tuple[str, str]], warnings: list[str]) -> None:
    """Check the matching options; warn of each asked for (none is supported)."""
    for name, warning in _NOT_SUPPORTED.items():
        values = [v.lower() for k, v in params if k == name]
        if any(v not in ("true", "false") for v in values):
            raise QueryError(f"{name} must be true or false")
        if "true" in values:
            warnings.append(warning)


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
    asked: dict[str, list[str]] = {}
    for key, value in params:
        if key in _CONTROL:
            continue
        keyword = _keyword(key)
        if keyword is None:
            warnings.append(f"{key[:_NAME_SHOWN]} is not a query parameter here; ignored")
            continue
        if keyword not in available or not ATTRIBUTES[keyword].matchable:
            supported = ", ".join(MATCHING_KEYS[level])
            named = key if key == keyword else f"{key} ({keyword})"
            raise QueryError(f"{named}: not a supported matching key here; use {supported}")
        if keyword not in returned:
            returned.append(keyword)
        values = asked.setdefault(keyword, [])
        if value != "":
            values.append(value)
    matches: list[Match] = []
    for keyword, values in asked.items():
        if len(values) > 1 and ATTRIBUTES[keyword].vr != "UI":
            # PS3.18 8.3.4.1: a key is unique unless it takes a UID list.
            raise QueryError(f"{keyword}: given more than once; send one value or a list")
        if values:
            matches.append(_match(keyword, ",".join(values)))
    _include(params, available, returned, warnings)
    _flags(params, warnings)
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
        # PS3.18 F.2.5: an empty value among several is null.
        return {"vr": vr, "Value": [v or None for v in value.split("\\")]}
    return {"vr": vr, "Value": [str(value)]}


def results(query: Query, result: SearchResult, base_url: str) -> list[dict[str, Any]]:
    """Each row as a DICOM JSON object with the attributes asked for and its RetrieveURL."""
    level = query.search.level
    out = []
    for row in result.rows:
        item: dict[str, Any] = {}
        for keyword in query.returned:
            if keyword in _WHEN_PRESENT and row.get(keyword) in (None, ""):
                continue
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
