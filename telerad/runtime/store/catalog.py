"""The catalog and job queue, as narrow ports named after what they hold, and `Catalog`,
all of them, for the gateway that wires them.

`telerad.runtime.store.backends.open` gives one from a URL: SQLite for one gateway per
site, PostgreSQL for several gateways and several sites on one database. Callers pass
`now` (seconds since the epoch) so that time is one decision of the caller, and tests can
move it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Protocol

from telerad.api.jobs import Finding, Job, WorklistEntry
from telerad.api.types import Priority
from telerad.runtime.dataset import Header
from telerad.runtime.store.search import Search, SearchResult


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """Where one version of an instance lives."""

    sop_uid: str
    version: int
    tier: str
    path: str
    size: int
    transfer_syntax: str
    result_of: int | None = None
    """The job whose result it is; None for what a sender sent."""


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
    """A study for the lifecycle pass: its tier and where each of its instances lies
    (path -> tier: one that arrived after the study moved on is still on the hot tier)."""

    study_uid: str
    tier: str
    deleting: bool
    files: dict[str, str]


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


class CatalogUnavailable(Exception):
    """The catalog's database cannot be used: the URL says what, the message why."""


class SchemaError(CatalogUnavailable):
    """The database's schema is not one this version of telerad can use (written by a
    newer telerad, or not a telerad catalog); nothing was changed."""


class Instances(Protocol):
    """Instances and their versions."""

    def versions(self, sop_uid: str) -> list[StoredInstance]:
        """Every stored version of an instance, oldest first."""

    def stored(self) -> list[StoredInstance]:
        """Every stored version of every instance of the site, in arrival order: the
        inventory a consistency check compares with the files."""

    def add_instance(self, header: Header, received: Received, now: float) -> Added:
        """Catalogue a durably written instance under the version its file took. A later
        version of an instance is a correction: its study, patient and series attributes
        replace those the catalog had (a job's result corrects nothing)."""

    def catalogued_paths(self, tier: str, study_uid: str) -> set[str]:
        """Paths of the study's instance files (every version) catalogued on `tier`."""

    def locate(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[Located]:
        """The latest version of each instance of a study (or one of its series, or one
        instance), in series and instance-number order; none while it is being deleted."""


class Queries(Protocol):
    """QIDO-RS searches."""

    def search(self, search: Search) -> SearchResult:
        """Studies, series or instances (their latest versions) that every match fits, in
        the order they arrived; none being deleted."""


class Studies(Protocol):
    """Studies and their completion."""

    def due_studies(self, quiet_before: float) -> list[str]:
        """Receiving studies quiet since `quiet_before`, or that reached their expected count."""

    def renew_quiet(self, now: float) -> int:
        """Give every study still receiving a fresh quiet window from `now` (at start: the
        time a gateway was down is not quiet, its senders could not send); returns how many."""

    def summary(self, study_uid: str) -> StudySummary: ...

    def complete_study(
        self, study_uid: str, round_: int, jobs: list[NewJob], now: float, max_attempts: int
    ) -> Completion | None:
        """Mark complete and queue jobs, unless an instance arrived since `summary`, or
        another process completed it first (then None): a compare-and-set on the round, so
        exactly one completion creates the study's jobs. A model whose job for this study
        still waits gets no second one."""

    def worklist(self, limit: int, offset: int) -> list[WorklistEntry]:
        """Most urgent first; critical findings first within a priority; then oldest."""


class Jobs(Protocol):
    """Jobs and their leases."""

    def claim(self, model: str, owner: str, lease_seconds: int, now: float) -> Job | None: ...

    def subscribe(self, wake: Callable[[str], None]) -> None:
        """Call `wake(model)` (from any thread) whenever a job of that model is queued or
        queued again, by whichever process sharing the catalog: claims wait on it. An
        empty model means any (notices may have been missed, as while reconnecting)."""

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

    def results(self, job_id: int) -> list[Located]:
        """The instances stored as the job's result."""

    def replaced_results(self, job_id: int) -> list[Located]:
        """The results this job's result replaces: those of the newest earlier done job of
        its model on its study (a study re-opened and routed again)."""


class Deliveries(Protocol):
    """The outbox: alerts and exports, sent until their target takes them."""

    def claim_deliveries(
        self, owner: str, now: float, limit: int, lease_seconds: Mapping[DeliveryKind, float]
    ) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first, leased to `owner`
        for as long as an attempt of their kind may take: no other sender sees them until
        the lease ends (delivered, failed, or its sender gone), so two senders never send
        one at once."""

    def release_deliveries(self, owner: str, now: float) -> int:
        """Due again now, those `owner` held: a sender that started again does not wait
        for the leases of its previous life; returns how many."""

    def delivered(self, delivery_id: int, now: float) -> None: ...

    def delivery_failed(
        self, delivery_id: int, error: str, retry_at: float | None, now: float
    ) -> None:
        """Try again from `retry_at`; None parks it (it stays, with its error)."""

    def delivery_states(self) -> dict[tuple[str, str], int]:
        """Deliveries by kind and state (pending, delivered, parked)."""


class Lifecycle(Protocol):
    """Where studies live, and their deletion."""

    def lifecycle_candidates(
        self, tier: str, last_received_before: float, limit: int
    ) -> list[StudyFiles]: ...

    def deleting_studies(self) -> list[StudyFiles]: ...

    def set_tier(self, study_uid: str, tier: str, paths: list[str]) -> None:
        """The study now lives in `tier`, and so do these of its instances (one that
        arrived while they moved keeps its own tier)."""

    def mark_deleting(self, study_uid: str) -> None: ...

    def forget_study(self, study_uid: str) -> None: ...


class Catalog(Instances, Queries, Studies, Jobs, Deliveries, Lifecycle, Protocol):
    """Every port, on one connection to one backend, for one site."""

    backend: str
    """Which backend holds it ("sqlite", "postgresql"): for logs and metrics."""

    def close(self) -> None: ...
