"""Catalog searches as SQL: one parameterised statement per `Search`, never a value
formatted into the text.

Person names match case-insensitively (LIKE folds ASCII case), as users of other PACS
expect; everything else is case-sensitive (GLOB). Ranges compare on the bound's own
precision, so `-1200` takes 12:00:59 too and `20240101-` takes every later date.
"""

from __future__ import annotations

from typing import Any

from telerad.runtime.store.catalog import ATTRIBUTES, Kind, Level, Match, Search

_LATEST = "i.version = (SELECT MAX(v.version) FROM instances v WHERE v.sop_uid = i.sop_uid)"
_MODALITIES = (
    "(SELECT group_concat(modality, '\\') FROM (SELECT DISTINCT m.modality FROM series m"
    " WHERE m.study_uid = s.study_uid AND m.modality IS NOT NULL ORDER BY m.modality))"
)

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
    "ModalitiesInStudy": _MODALITIES,
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
_ORDER = {
    Level.STUDY: "s.first_received, s.study_uid",
    Level.SERIES: "s.first_received, s.study_uid, se.rowid",
    Level.INSTANCE: "s.first_received, s.study_uid, se.rowid,"
    " CAST(i.instance_number AS INTEGER), i.sop_uid",
}


def keywords(level: Level) -> list[str]:
    """What a search at `level` returns: its attributes and those of the levels above."""
    return [k for k, a in ATTRIBUTES.items() if a.level <= level]


def _glob(value: str) -> str:
    # DICOM's * and ? are GLOB's; a literal [ must be bracketed to lose its meaning.
    return value.replace("[", "[[]")


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(match: Match) -> tuple[str, list[Any]]:  # noqa: PLR0911  (one per kind)
    attribute = ATTRIBUTES[match.keyword]
    column = COLUMNS[match.keyword]
    if match.keyword == "ModalitiesInStudy":
        # A study matches when any of its series does.
        inner, args = _condition(Match("Modality", match.kind, match.values))
        return (
            f"EXISTS (SELECT 1 FROM series se WHERE se.study_uid = s.study_uid AND {inner})",  # noqa: S608
            args,
        )
    if attribute.vr in ("US",) or match.keyword in ("SeriesNumber", "InstanceNumber"):
        column = f"CAST({column} AS INTEGER)"
    if match.kind == Kind.ANY_OF:
        if attribute.vr == "PN" or any("*" in v or "?" in v for v in match.values):
            ors = [_condition(Match(match.keyword, _kind(v), (v,))) for v in match.values]
            text = " OR ".join(f"({c})" for c, _ in ors)
            return f"({text})", [a for _, args in ors for a in args]
        marks = ", ".join("?" for _ in match.values)
        cast = column.startswith("CAST(")
        return f"{column} IN ({marks})", [int(v) if cast else v for v in match.values]
    if match.kind == Kind.RANGE:
        low, high = match.values
        parts, args = [], []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            parts.append(f"substr({column}, 1, {len(high)}) <= ?")
            args.append(high)
        return " AND ".join(parts) or "1", args
    (value,) = match.values
    if attribute.vr == "PN":
        return f"{column} LIKE ? ESCAPE '\\'", [_like(value)]
    if match.kind == Kind.WILDCARD:
        return f"{column} GLOB ?", [_glob(value)]
    if column.startswith("CAST("):
        return f"{column} = ?", [int(value)]
    return f"{column} = ?", [value]


def _kind(value: str) -> Kind:
    return Kind.WILDCARD if "*" in value or "?" in value else Kind.EXACT


def build(search: Search) -> tuple[str, list[Any], list[str]]:
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
        condition, values = _condition(match)
        where.append(f"({condition})")
        args.extend(values)
    columns = ", ".join(_AT_LEVEL.get((n, search.level), COLUMNS[n]) for n in names)
    # Only this module's constants are formatted in; every value is a parameter.
    sql = (
        f"SELECT {columns} FROM {_FROM[search.level]}"  # noqa: S608
        f" WHERE {' AND '.join(where)} ORDER BY {_ORDER[search.level]} LIMIT ? OFFSET ?"
    )
    return sql, [*args, search.limit + 1, search.offset], names
