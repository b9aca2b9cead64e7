"""RoutingPolicy: which studies go to which models, and how urgently."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from telerad.api.aimodel import BodyPart
from telerad.api.base import SET, ApiModel, list_map, one_of
from telerad.api.names import POLICY_NAME_MAX
from telerad.api.types import (
    AETitle,
    DicomUID,
    DNSLabel,
    LabelSelector,
    Modality,
    ObjectMeta,
    Priority,
    Status,
    name_rule,
)


class SiteSelection(ApiModel):
    """The sites a policy applies to: by label selector or by name, not both."""

    __rules__: ClassVar = (
        one_of("selector", "names", "sites sets exactly one of selector or names"),
    )

    selector: LabelSelector | None = None
    """ImagingSites whose labels match."""
    names: Annotated[list[DNSLabel], SET] | None = Field(default=None, max_length=256)
    """ImagingSites by name."""


class Match(ApiModel):
    """What a study must be for a rule to apply; every field set must match, empty
    fields match anything."""

    modalities: Annotated[list[Modality], SET] = Field(default_factory=list, max_length=16)
    """Any of these modalities in the study."""
    body_parts: Annotated[list[BodyPart], SET] = Field(default_factory=list, max_length=64)
    """Any of these Body Part Examined codes."""
    sop_classes: Annotated[list[DicomUID], SET] = Field(default_factory=list, max_length=64)
    """Any of these SOP Class UIDs."""
    calling_ae_titles: Annotated[list[AETitle], SET] = Field(
        default_factory=list, max_length=64, alias="callingAETitles"
    )
    """Sent by one of these AE titles."""
    study_description: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """Study Description pattern with DICOM wildcards (* and ?), case-insensitive."""


class RoutingRule(ApiModel):
    """One rule: matching studies go to these models at this priority."""

    name: DNSLabel
    """Unique name of the rule, used in status and metrics."""
    match: Match = Field(default_factory=Match)
    """Which studies the rule takes."""
    models: Annotated[list[DNSLabel], SET] = Field(min_length=1, max_length=16)
    """AIModels (same namespace) that receive the study; one job each."""
    priority: Priority = Priority.ROUTINE
    """Worklist priority of the jobs, raised later by critical findings."""
    deidentify: bool = False
    """De-identify the study before any model sees it (always done for third-party models)."""
    notify: bool = True
    """Send critical findings of these jobs to the site's webhooks."""


class RoutingPolicySpec(ApiModel):
    """Desired routing of studies to models."""

    sites: SiteSelection
    """The ImagingSites this policy applies to."""
    rules: Annotated[list[RoutingRule], list_map("name")] = Field(min_length=1, max_length=128)
    """Rules in order: the first rule that matches a study decides its models and priority."""


class RoutingPolicyStatus(Status):
    """Observed state of a routing policy."""

    sites: list[DNSLabel] = Field(default_factory=list, max_length=256)
    """Sites the policy is compiled into."""
    warnings: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=128
    )
    """Rules that can never match or are shadowed by an earlier rule."""


class RoutingPolicy(ApiModel):
    """Which studies go to which AI models, and how urgently."""

    __rules__: ClassVar = (name_rule("RoutingPolicy", POLICY_NAME_MAX, ""),)

    api_version: Literal["telerad.io/v1alpha1"] = "telerad.io/v1alpha1"
    kind: Literal["RoutingPolicy"] = "RoutingPolicy"
    metadata: ObjectMeta
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus | None = None
