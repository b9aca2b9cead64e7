"""What a catalog search is, in DICOM terms: the attributes a catalog holds by keyword,
their levels, and the matches QIDO-RS asks for. No SQL: every backend builds its own
statement from a `Search`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final


class Level(IntEnum):
    """Query/retrieve levels, outermost first."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


@dataclass(frozen=True, slots=True)
class Attribute:
    """An attribute the catalog can search on or return."""

    level: Level
    vr: str
    matchable: bool = True
    """False for computed attributes (counts), which are only returned."""


# What the catalog holds, by DICOM keyword: the QIDO-RS keys and return attributes of
# PS3.18 table 10.6.3-3..5 that a study's data carries (plus body part, used in routing).
ATTRIBUTES: Final[dict[str, Attribute]] = {
    # That of the latest instance of the study, series or instance a result is.
    "SpecificCharacterSet": Attribute(Level.STUDY, "CS", matchable=False),
    "StudyInstanceUID": Attribute(Level.STUDY, "UI"),
    "StudyDate": Attribute(Level.STUDY, "DA"),
    "StudyTime": Attribute(Level.STUDY, "TM"),
    "AccessionNumber": Attribute(Level.STUDY, "SH"),
    "StudyID": Attribute(Level.STUDY, "SH"),
    "StudyDescription": Attribute(Level.STUDY, "LO"),
    "ReferringPhysicianName": Attribute(Level.STUDY, "PN"),
    "PatientName": Attribute(Level.STUDY, "PN"),
    "PatientID": Attribute(Level.STUDY, "LO"),
    "PatientBirthDate": Attribute(Level.STUDY, "DA"),
    "PatientSex": Attribute(Level.STUDY, "CS"),
    "ModalitiesInStudy": Attribute(Level.STUDY, "CS"),
    "NumberOfStudyRelatedSeries": Attribute(Level.STUDY, "IS", matchable=False),
    "NumberOfStudyRelatedInstances": Attribute(Level.STUDY, "IS", matchable=False),
    "SeriesInstanceUID": Attribute(Level.SERIES, "UI"),
    "Modality": Attribute(Level.SERIES, "CS"),
    "SeriesNumber": Attribute(Level.SERIES, "IS"),
    "SeriesDescription": Attribute(Level.SERIES, "LO"),
    "BodyPartExamined": Attribute(Level.SERIES, "CS"),
    "NumberOfSeriesRelatedInstances": Attribute(Level.SERIES, "IS", matchable=False),
    "SOPInstanceUID": Attribute(Level.INSTANCE, "UI"),
    "SOPClassUID": Attribute(Level.INSTANCE, "UI"),
    "InstanceNumber": Attribute(Level.INSTANCE, "IS"),
    "Rows": Attribute(Level.INSTANCE, "US"),
    "Columns": Attribute(Level.INSTANCE, "US"),
    "BitsAllocated": Attribute(Level.INSTANCE, "US"),
    "NumberOfFrames": Attribute(Level.INSTANCE, "IS"),
    "AvailableTransferSyntaxUID": Attribute(Level.INSTANCE, "UI", matchable=False),
}


class Kind(StrEnum):
    EXACT = "exact"
    """Equal to the value (case-insensitive for person names)."""
    WILDCARD = "wildcard"
    """`*` any run, `?` one character (case-insensitive for person names)."""
    ANY_OF = "any-of"
    """Matches one of the values, each exact or (on text) a wildcard: UID list matching,
    and value lists of other attributes."""
    RANGE = "range"
    """Between two values, either open; compared on the bound's precision."""


@dataclass(frozen=True, slots=True)
class Match:
    keyword: str
    kind: Kind
    values: tuple[str, ...]
    """One value; several for ANY_OF; (low, high) for RANGE with "" for an open end."""


@dataclass(frozen=True, slots=True)
class Search:
    level: Level
    matches: tuple[Match, ...] = ()
    study_uid: str | None = None
    series_uid: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class SearchResult:
    rows: list[dict[str, str | int | None]]
    """Every catalogued attribute of the level and those above it, by keyword."""
    more: bool
    """More rows match beyond the limit."""


def keywords(level: Level) -> list[str]:
    """What a search at `level` returns: its attributes and those of the levels above."""
    return [k for k, a in ATTRIBUTES.items() if a.level <= level]
