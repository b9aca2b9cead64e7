"""The gateway's JSON API: what workers send and receive, the worklist, and exports.

One definition for the gateway that serves it and the worker that calls it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from telerad.api.aimodel import Ratio
from telerad.api.base import ApiModel
from telerad.api.types import DicomUID, DNSLabel, Priority

Seconds = Annotated[int, Field(ge=1, le=3600)]
Owner = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:@/-]+$")]
Token = Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._ -]+$")]

JOB_HEADER = "Telerad-Job"
"""`<job id>:<lease token>` on a WADO-RS or STOW-RS request made for a leased job. The
gateway checks the lease; it serves a de-identified study when the job asks for one, and
a result stored under it does not make the study route again."""
LEASE_NOT_HELD = 412
"""What such a request gets when the lease is not held (409 already means "nothing
stored" to STOW-RS)."""


class JobState(StrEnum):
    """Where a job is; parked jobs wait for a person, they are never dropped."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    PARKED = "parked"


class Finding(ApiModel):
    """One finding of a model on a study."""

    label: Label
    """What was found, e.g. hyperdensity."""
    score: Ratio
    """Model confidence in [0, 1]."""
    critical: bool = False
    """The worker judged it critical; the gateway also applies the model's thresholds."""
    measurements: dict[Label, float] = Field(default_factory=dict, max_length=32)
    """Named measurements (volumes, diameters), in the units the label implies."""


class Lease(ApiModel):
    """Who holds a job and until when."""

    owner: Owner
    token: Token
    """Proof of holding the lease: extend, complete and fail must present it."""
    expires_at: datetime


class ResultRef(ApiModel):
    """A stored result instance, as a later result names it (Predecessor Documents)."""

    study_uid: DicomUID
    series_uid: DicomUID
    sop_uid: DicomUID
    sop_class_uid: DicomUID


class Job(ApiModel):
    """A study queued for one model."""

    id: int
    study_uid: str
    model: DNSLabel
    priority: Priority
    state: JobState
    attempts: int
    """Claims so far, including ones whose lease expired."""
    max_attempts: int
    rule: str
    """policy/rule that created the job."""
    deidentify: bool
    notify: bool
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None = None
    """Earliest next claim after a failure (backoff)."""
    lease: Lease | None = None
    reason: str | None = None
    """Why the job last failed or was parked."""
    findings: list[Finding] = Field(default_factory=list)
    critical: bool = False
    """Some finding is critical under the worker's or the model's thresholds."""
    replaces: list[ResultRef] = Field(default_factory=list)
    """On a claim: the results of this model's newest earlier job on the study (it was
    re-opened and read again), which this job's result replaces and must name as its
    predecessors; in the UIDs the job sees (pseudonyms when it is de-identified)."""


class ClaimRequest(ApiModel):
    """Take the most urgent waiting job of a model."""

    model: DNSLabel
    owner: Owner
    """Worker identity (pod name), recorded on the lease."""
    lease_seconds: Seconds = 60


class ExtendRequest(ApiModel):
    token: Token
    lease_seconds: Seconds = 60


class CompleteRequest(ApiModel):
    token: Token
    findings: list[Finding] = Field(default_factory=list, max_length=256)


class FailRequest(ApiModel):
    token: Token
    reason: Annotated[str, Field(min_length=1, max_length=1024)]
    """What went wrong, for the person who looks at a parked job. Never patient data."""
    retryable: bool = True
    """False parks the job at once (the study can never succeed as it is)."""


class WorklistJob(ApiModel):
    id: int
    model: DNSLabel
    state: JobState
    critical: bool


class WorklistEntry(ApiModel):
    """A study as the reading radiologist's list orders it."""

    study_uid: str
    priority: Priority | None
    """Highest priority of its jobs, raised to stat by a critical finding; None: no job."""
    complete: bool
    """The study has been quiet long enough (or reached its expected count)."""
    critical: bool
    received_at: datetime
    completed_at: datetime | None = None
    modalities: list[str] = Field(default_factory=list)
    instances: int
    jobs: list[WorklistJob] = Field(default_factory=list)


class Problem(ApiModel):
    """Error body of every failed request (RFC 9457 subset)."""

    title: str
    status: int
    detail: str


class ExportRequest(ApiModel):
    """Send a study to one of the site's destinations now."""

    study: DicomUID
    """Study Instance UID."""
    destination: DNSLabel
    """Name of a destination in the site's spec."""


class ExportReport(ApiModel):
    """What the destination answered."""

    destination: DNSLabel
    status: int
    """HTTP status of the destination's STOW-RS answer."""
    stored: int
    """Instances the destination stored."""
    failed: int
    """Instances it refused."""
