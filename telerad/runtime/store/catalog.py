"""The catalog and job queue, as one small interface.

SQLite implements it for one gateway per site (`telerad.runtime.store.sqlite`); a
PostgreSQL backend for scale-out implements the same methods. Callers pass `now`
(seconds since the epoch) so that time is one decision of the caller, and tests can move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import PurePosixPath
from typing import Final, Protocol

from telerad.api.jobs import Finding, Job, WorklistEntry
from telerad.api.types import Priority
from telerad.runtime.dataset import Header

HOT = "hot"
WARM = "warm"


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """Where one version of an instance lives."""

    sop_uid: str
    version: int
    tier: str
    path: str
    size: int
    transfer_syntax: str


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


@dataclass(frozen=True, slots=True)
class Located:
    """The latest version of an instance, for serving it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    tier: str
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Received:
    """An instance as received and durably written: its version and path are taken."""

    version: int
    path: PurePosixPath
    size: int
    transfer_syntax: str
    calling_ae: str
    result_of: int | None = None
    """The job whose result this is (stored under its lease): it is what the job's
    deliveries send, and it does not re-open the study."""
    reopens: bool = True
    """Arriving in a completed study, it makes the study route again (False for a job's
    result and for objects no rule routes on, such as a reader's report)."""


@dataclass(frozen=True, slots=True)
class Added:
    reopened: bool = False
    """The instance re-opened a completed study."""
    restored: bool = False
    """Its version was catalogued already, with its file missing (never acknowledged: a
    crash came between the file and the catalog); the row now describes the new file."""


@dataclass(frozen=True, slots=True)
class StudySummary:
    """What routing looks at when a study completes."""

    study_uid: str
    round: int
    """Bumped whenever an instance re-opens the study; completion must match it."""
    modalities: frozenset[str]
    body_parts: frozenset[str]
    sop_classes: frozenset[str]
    calling_ae_titles: frozenset[str]
    description: str
    instances: int
    first_received: float


@dataclass(frozen=True, slots=True)
class NewJob:
    model: str
    priority: Priority
    rule: str
    deidentify: bool
    notify: bool


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of completing a study."""

    jobs: list[Job]
    first_received: float


@dataclass(frozen=True, slots=True)
class StudyFiles:
    """A study for the lifecycle pass: its tier and its instances' paths."""

    study_uid: str
    tier: str
    deleting: bool
    paths: list[str]


class DeliveryKind(StrEnum):
    ALERT = "alert"
    """A critical-finding webhook."""
    EXPORT = "export"
    """A job's result to one of the site's destinations."""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    kind: DeliveryKind
    target: str
    """Webhook or destination name."""
    payload: str
    """JSON the sender needs (the alert body; nothing for an export)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message in the outbox: written with the job's completion, in one transaction, and
    sent until its target takes it."""

    id: int
    kind: DeliveryKind
    target: str
    key: str
    """Idempotency key, the same on every attempt."""
    job_id: int
    study_uid: str
    payload: str
    attempts: int
    created_at: float


class LeaseLost(Exception):
    """The job is not leased under this token any more (expired and re-claimed, or done)."""


class UnknownJob(KeyError):
    """No job has this id."""


class Catalog(Protocol):
    # -- instances -------------------------------------------------------------
    def versions(self, sop_uid: str) -> list[StoredInstance]:
        """Every stored version of an instance, oldest first."""

    def add_instance(self, header: Header, received: Received, now: float) -> Added:
        """Catalogue a durably written instance under the version its file took. A later
        version of an instance is a correction: its study, patient and series attributes
        replace those the catalog had (a job's result corrects nothing)."""

    def catalogued_paths(self, tier: str, study_uid: str) -> set[str]:
        """Paths of the study's instance files (every version) catalogued on `tier`."""

    def search(self, search: Search) -> SearchResult:
        """Studies, series or instances (their latest versions) that every match fits, in
        the order they arrived; none being deleted."""

    def locate(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[Located]:
        """The latest version of each instance of a study (or one of its series, or one
        instance), in series and instance-number order; none while it is being deleted."""

    # -- completion ------------------------------------------------------------
    def due_studies(self, quiet_before: float) -> list[str]:
        """Receiving studies quiet since `quiet_before`, or that reached their expected count."""

    def renew_quiet(self, now: float) -> int:
        """Give every study still receiving a fresh quiet window from `now` (at start: the
        time a gateway was down is not quiet, its senders could not send); returns how many."""

    def summary(self, study_uid: str) -> StudySummary: ...

    def complete_study(
        self, study_uid: str, round_: int, jobs: list[NewJob], now: float, max_attempts: int
    ) -> Completion | None:
        """Mark complete and queue jobs, unless an instance arrived since `summary`
        (then None). A model whose job for this study still waits gets no second one."""

    # -- jobs ------------------------------------------------------------------
    def claim(self, model: str, owner: str, lease_seconds: int, now: float) -> Job | None: ...

    def extend(self, job_id: int, token: str, lease_seconds: int, now: float) -> Job: ...

    def leased_job(self, job_id: int, token: str) -> Job:
        """The job, if it is leased under this token (else LeaseLost or UnknownJob)."""

    def complete_job(
        self,
        job_id: int,
        token: str,
        findings: list[Finding],
        critical: bool,
        now: float,
        *,
        deliveries: Sequence[NewDelivery] = (),
    ) -> Job:
        """Done, with the deliveries it causes put in the outbox in the same transaction,
        unless a newer job of the model on the study is done already: an outdated result
        alerts and exports nothing. The study's worklist priority and critical flag follow
        the newest job of each model (the newest done one for the critical flag)."""

    def fail_job(
        self, job_id: int, token: str, reason: str, retry_at: float | None, now: float
    ) -> Job:
        """Queue again from `retry_at`, or park when it is None or attempts are spent."""

    def job(self, job_id: int) -> Job: ...

    def jobs(
        self,
        *,
        state: str | None,
        model: str | None,
        limit: int,
        offset: int,
        claimable_at: float | None = None,
    ) -> list[Job]:
        """Most urgent first; with `claimable_at`, only those a claim would take then."""

    def queue_depth(self, now: float) -> dict[tuple[str, Priority], int]:
        """Jobs waiting to be claimed, by model and priority."""

    def queue_oldest(self, now: float) -> dict[tuple[str, Priority], float]:
        """When the oldest waiting job of each model and priority was queued (epoch s)."""

    def job_states(self) -> dict[tuple[str, str], int]:
        """Jobs by model and state."""

    def worklist(self, limit: int, offset: int) -> list[WorklistEntry]:
        """Most urgent first; critical findings first within a priority; then oldest."""

    def results(self, job_id: int) -> list[Located]:
        """The instances stored as the job's result."""

    def replaced_results(self, job_id: int) -> list[Located]:
        """The results this job's result replaces: those of the newest earlier done job of
        its model on its study (a study re-opened and routed again)."""

    # -- outbox ----------------------------------------------------------------
    def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first."""

    def delivered(self, delivery_id: int, now: float) -> None: ...

    def delivery_failed(
        self, delivery_id: int, error: str, retry_at: float | None, now: float
    ) -> None:
        """Try again from `retry_at`; None parks it (it stays, with its error)."""

    def delivery_states(self) -> dict[tuple[str, str], int]:
        """Deliveries by kind and state (pending, delivered, parked)."""

    # -- lifecycle -------------------------------------------------------------
    def lifecycle_candidates(
        self, tier: str, last_received_before: float, limit: int
    ) -> list[StudyFiles]: ...

    def deleting_studies(self) -> list[StudyFiles]: ...

    def set_tier(self, study_uid: str, tier: str, paths: list[str]) -> None:
        """The study now lives in `tier`, and so do these of its instances (one that
        arrived while they moved keeps its own tier)."""

    def mark_deleting(self, study_uid: str) -> None: ...

    def forget_study(self, study_uid: str) -> None: ...

    def close(self) -> None: ...
