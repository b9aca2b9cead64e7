"""Field types shared by the resources: names, quantities, scheduling, conditions."""

from __future__ import annotations

import datetime
import re
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from telerad.api.base import ApiModel, Matches, Rule, list_map

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL_RE = re.compile(DNS_LABEL)
DNSLabel = Annotated[
    str,
    Matches(
        DNS_LABEL,
        "must be a lowercase DNS label: letters, digits and '-', starting with a letter",
        max_length=63,
    ),
]

AE_TITLE = r"^ *[!-\[\]-~][ -\[\]-~]*$"
AETitle = Annotated[
    str,
    Matches(
        AE_TITLE,
        "must be a DICOM AE title: printable ASCII without backslash, not all spaces",
        max_length=16,
        min_length=1,
        cel=True,
    ),
]

# Kubernetes resource quantities in their canonical forms ("500m", "2", "8Gi", "1.5G").
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
Quantity = Annotated[
    str, Matches(QUANTITY, "must be a Kubernetes quantity such as 500m, 2, 8Gi", max_length=32)
]
_QUANTITY_RE = re.compile(QUANTITY)
_SUFFIXES = {"m": Decimal("0.001"), "": Decimal(1)} | {
    prefix: Decimal(base) ** power
    for base, prefixes in ((1000, "kMGTPE"), (1024, ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")))
    for power, prefix in enumerate(prefixes, start=1)
}


def quantity_bytes(quantity: str) -> int:
    """A quantity of bytes as an integer (a fraction of a byte rounds down). Written here
    rather than taken from lightkube, since the API layer stays free of client libraries."""
    match = _QUANTITY_RE.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    suffix = match.group(2) or ""
    return int(Decimal(quantity.removesuffix(suffix)) * _SUFFIXES[suffix])


# IPv4 or IPv6 CIDR; the address check is kept simple and identical on both sides.
CIDR = (
    r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])"
    r"|[0-9a-fA-F:]+/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))$"
)
Cidr = Annotated[str, Matches(CIDR, "must be a CIDR such as 10.0.0.0/8 or fd00::/8", max_length=64)]

# DICOM UIDs (PS3.5 9.1): dot-separated numeric components, no leading zeros, <= 64 chars.
UID = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
DicomUID = Annotated[
    str, Matches(UID, "must be a DICOM UID such as 1.2.840.10008.5.1.4.1.1.2", max_length=64)
]

# Whitespace spelt out: Python's \s also matches Unicode spaces, RE2's does not.
HTTP_URL = r"^https?://[^\t\n\f\r /$.?#][^\t\n\f\r ]*$"
HttpUrl = Annotated[str, Matches(HTTP_URL, "must be an http:// or https:// URL", max_length=2048)]

LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=63)]


class Priority(StrEnum):
    """Worklist priority of a study, highest first."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Sort key, 0 the most urgent; the catalog stores priorities as this rank."""
        return list(Priority).index(self)

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return list(cls)[rank]

    def reaches(self, lowest: Priority) -> bool:
        """This priority is `lowest` or more urgent."""
        return self.rank <= lowest.rank


class Modality(StrEnum):
    """DICOM modality codes (PS3.3 C.7.3.1.1.1) that AI models commonly take."""

    CT = "CT"
    MR = "MR"
    CR = "CR"
    DX = "DX"
    MG = "MG"
    US = "US"
    PT = "PT"
    NM = "NM"
    XA = "XA"
    RF = "RF"
    OT = "OT"


class ResourceRequirements(ApiModel):
    """Compute resources of a container, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Minimum resources the scheduler reserves, e.g. {cpu: 500m, memory: 1Gi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Maximum resources the container may use."""


class Toleration(ApiModel):
    """A Pod toleration, as in a Pod spec."""

    key: Annotated[str, Field(max_length=317)] | None = None
    """Taint key the toleration matches; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches value exactly."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class LabelSelectorRequirement(ApiModel):
    """One expression of a label selector."""

    key: LabelKey
    """Label key the expression applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Values for In and NotIn; empty for Exists and DoesNotExist."""


class LabelSelector(ApiModel):
    """A Kubernetes label selector; an empty selector matches every object."""

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    """Labels an object must carry, all of them."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Set-based requirements, all of which must hold."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace."""

    name: DNSLabel
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key within the Secret."""


class SecretRef(ApiModel):
    """A Secret in the same namespace, as a whole."""

    name: DNSLabel
    """Name of the Secret."""


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """The state of one aspect of an object, as in Kubernetes API conventions."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    """Condition type: Ready, Progressing, Degraded, or one of the kind's own."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[
        str,
        Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
    ]
    """A CamelCase word saying why, for machines."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """A sentence saying why, for people."""
    last_transition_time: datetime.datetime
    """When status last changed (not when the condition was last written)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation this condition was computed from."""


Conditions = Annotated[
    list[Condition],
    list_map("type"),
    Field(default_factory=list, max_length=32),
]


class Status(ApiModel):
    """What every kind's status starts with."""

    conditions: Conditions
    """Ready, Progressing and Degraded (Accepted and ResolvedRefs on a RoutingPolicy)."""
    observed_generation: int | None = None
    """The metadata.generation the status describes."""


class ObjectMeta(ApiModel):
    """The parts of metadata telerad reads; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")

    name: str
    """Object name."""
    namespace: str | None = None
    """Namespace the object lives in."""
    generation: int | None = None
    """Generation of the spec, bumped by the server on every spec change."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Object labels."""


def name_rule(kind: str, max_length: int, longest_suffix: str) -> Rule:
    """The root rule that keeps every child's name a valid DNS label."""
    return Rule(
        f"self.metadata.name.size() <= {max_length} && self.metadata.name.matches(r'{DNS_LABEL}')",
        f"metadata.name must be a DNS label of at most {max_length} characters starting "
        f"with a letter: the {kind}'s children add '{longest_suffix}' and Kubernetes "
        "names stop at 63",
        lambda obj: (
            len(obj.metadata.name) <= max_length
            and _DNS_LABEL_RE.fullmatch(obj.metadata.name) is not None
        ),
        field_path=".metadata.name",
    )
