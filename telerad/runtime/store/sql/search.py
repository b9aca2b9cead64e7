"""Catalog searches as SQL: one parameterised statement per `Search`, never a value
formatted into the text.

Person names match case-insensitively, as users of other PACS expect; everything else is
case-sensitive. Ranges compare on the bound's own precision, so `-1200` takes 12:00:59 too
and `20240101-` takes every later date.
"""

from __future__ import annotations

from typing import Any

from telerad.runtime.store.search import ATTRIBUTES, Kind, Level, Match, Search, keywords
from telerad.runtime.store.sql.database import Dialect

_LATEST = "i.version = (SELECT MAX(v.version) FROM instances v WHERE v.sop_uid = i.sop_uid)"
# Text columns compared as numbers.
_NUMBERS = ("SeriesNumber", "InstanceNumber")

# Keyword -> SQL expression over s (studies), p (patients), se (series), i (instances).
COLUMNS: dict[str, str] = {
    "StudyInstanceUID": "s.study_uid",
    "StudyDate": "s.study_date",
    "StudyTime": "s.study_time",
    "AccessionNumber": "s.accession_number",
    "StudyID": "s.study_id",
    "StudyDescription": "s.description",
    "ReferringPhysicianName": "s.referring_physician",
    "PatientName": "p.patient_name",
    "PatientID": "p.patient_id",
    "PatientBirthDate": "p.birth_date",
    "PatientSex": "p.sex",
    "NumberOfStudyRelatedSeries": (
        "(SELECT COUNT(*) FROM series c WHERE c.study_uid = s.study_uid)"
    ),
    "NumberOfStudyRelatedInstances": "s.instance_count",
    "SeriesInstanceUID": "se.series_uid",
    "Modality": "se.modality",
    "SeriesNumber": "se.series_number",
    "SeriesDescription": "se.description",
    "BodyPartExamined": "se.body_part",
    "NumberOfSeriesRelatedInstances": (
        "(SELECT COUNT(DISTINCT c.sop_uid) FROM instances c WHERE c.series_uid = se.series_uid)"
    ),
    "SOPInstanceUID": "i.sop_uid",
    "SOPClassUID": "i.sop_class_uid",
    "InstanceNumber": "i.instance_number",
    "Rows": "i.rows",
    "Columns": "i.columns",
    "BitsAllocated": "i.bits_allocated",
    "NumberOfFrames": "i.number_of_frames",
    "AvailableTransferSyntaxUID": "i.transfer_syntax",
    "SpecificCharacterSet": "(SELECT c.specific_character_set FROM instances c"
    " WHERE c.study_uid = s.study_uid ORDER BY c.received_at DESC LIMIT 1)",
}
# Attributes whose value depends on the level of the result.
_AT_LEVEL: dict[tuple[str, Level], str] = {
    ("SpecificCharacterSet", Level.SERIES): "(SELECT c.specific_character_set FROM instances c"
    " WHERE c.series_uid = se.series_uid ORDER BY c.received_at DESC LIMIT 1)",
    ("SpecificCharacterSet", Level.INSTANCE): "i.specific_character_set",
}

_FROM = {
    Level.STUDY: "studies s LEFT JOIN patients p ON p.patient_key = s.patient_key",
    Level.SERIES: "series se JOIN studies s ON s.study_uid = se.study_uid"
    " LEFT JOIN patients p ON p.patient_key = s.patient_key",
    Level.INSTANCE: "instances i JOIN series se ON se.series_uid = i.series_uid"
    " JOIN studies s ON s.study_uid = i.study_uid"
    " LEFT JOIN patients p ON p.patient_key = s.patient_key",
}


def _order(level: Level, dialect: Dialect) -> str:
    order = ["s.first_received", "s.study_uid"]
    if level >= Level.SERIES:
        order.append(dialect.series_order)
    if level == Level.INSTANCE:
        order += [dialect.integer("i.instance_number"), "i.sop_uid"]
    return ", ".join(order)


def _column(keyword: str, level: Level, dialect: Dialect) -> str:
    if keyword == "ModalitiesInStudy":
        return dialect.modalities
    return _AT_LEVEL.get((keyword, level), COLUMNS[keyword])


def _glob(value: str) -> str:
    # DICOM's * and ? are GLOB's; a literal [ must be bracketed to lose its meaning.
    return value.replace("[", "[[]")


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(  # noqa: PLR0911  (one per kind)
    match: Match, dialect: Dialect
) -> tuple[str, list[Any]]:
    attribute = ATTRIBUTES[match.keyword]
    column = COLUMNS.get(match.keyword, "")
    if match.keyword == "ModalitiesInStudy":
        # A study matches when any of its series does.
        inner, args = _condition(Match("Modality", match.kind, match.values), dialect)
        return (
            f"EXISTS (SELECT 1 FROM series se WHERE se.study_uid = s.study_uid AND {inner})",  # noqa: S608
            args,
        )
    number = attribute.vr == "US" or match.keyword in _NUMBERS
    if match.keyword in _NUMBERS:
        column = dialect.integer(column)
    if match.kind == Kind.ANY_OF:
        if attribute.vr == "PN" or any("*" in v or "?" in v for v in match.values):
            ors = [_condition(Match(match.keyword, _kind(v), (v,)), dialect) for v in match.values]
            text = " OR ".join(f"({c})" for c, _ in ors)
            return f"({text})", [a for _, args in ors for a in args]
        marks = ", ".join("?" for _ in match.values)
        return f"{column} IN ({marks})", [int(v) if number else v for v in match.values]
    if match.kind == Kind.RANGE:
        low, high = match.values
        parts, args = [], []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            parts.append(f"substr({column}, 1, {len(high)}) <= ?")
            args.append(high)
        return " AND ".join(parts) or "1 = 1", args
    (value,) = match.values
    if attribute.vr == "PN":
        return f"{column} {dialect.nocase} ? ESCAPE '\\'", [_like(value)]
    if match.kind == Kind.WILDCARD:
        if dialect.wildcard == "GLOB":
            return f"{column} GLOB ?", [_glob(value)]
        return f"{column} {dialect.wildcard} ? ESCAPE '\\'", [_like(value)]
    return f"{column} = ?", [int(value) if number else value]


def _kind(value: str) -> Kind:
    return Kind.WILDCARD if "*" in value or "?" in value else Kind.EXACT


def build(search: Search, dialect: Dialect) -> tuple[str, list[Any], list[str]]:
    """The statement, its arguments and the keywords of its result columns. One row more
    than the limit is asked for, to tell whether there are more."""
    names = keywords(search.level)
    where = ["s.deleting = 0"]
    args: list[Any] = []
    if search.level == Level.INSTANCE:
        where.append(_LATEST)
    if search.study_uid is not None:
        where.append("s.study_uid = ?")
        args.append(search.study_uid)
    if search.series_uid is not None:
        where.append("se.series_uid = ?")
        args.append(search.series_uid)
    for match in search.matches:
        condition, values = _condition(match, dialect)
        where.append(f"({condition})")
        args.extend(values)
    columns = ", ".join(_column(n, search.level, dialect) for n in names)
    # Only this module's constants are formatted in; every value is a parameter.
    sql = (
        f"SELECT {columns} FROM {_FROM[search.level]}"  # noqa: S608
        f" WHERE {' AND '.join(where)} ORDER BY {_order(search.level, dialect)}"
        " LIMIT ? OFFSET ?"
    )
    return sql, [*args, search.limit + 1, search.offset], names
