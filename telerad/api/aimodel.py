"""AIModel: one AI algorithm offered in a tenant namespace, and its GPU workers."""

from __future__ import annotations

import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from telerad.api.base import SET, ApiModel, Matches, Rule
from telerad.api.names import MODEL_NAME_MAX, MODEL_SUFFIXES, longest
from telerad.api.types import (
    DicomUID,
    HttpUrl,
    LabelValue,
    Modality,
    ObjectMeta,
    ResourceRequirements,
    Status,
    Toleration,
    name_rule,
)

Image = Annotated[str, Field(min_length=1, max_length=512)]
BodyPart = Annotated[
    str,
    Matches(
        r"^[A-Z0-9_]{1,16}$",
        "must be a DICOM Body Part Examined code such as HEAD or CHEST",
        max_length=16,
    ),
]
ClockTime = Annotated[
    str, Matches(r"^([01][0-9]|2[0-3]):[0-5][0-9]$", "must be a time of day as HH:MM", max_length=5)
]
Ratio = Annotated[float, Field(ge=0, le=1)]


class ModelRef(ApiModel):
    """The model plugin the worker loads."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    """Entry-point name of the plugin (group telerad.models)."""
    version: Annotated[str, Field(min_length=1, max_length=64)]
    """Version of the model; it travels into every result."""


class IntendedUse(ApiModel):
    """What the model is made for; a route outside it is refused."""

    modalities: Annotated[list[Modality], SET] = Field(min_length=1, max_length=16)
    """Modalities the model reads."""
    body_parts: Annotated[list[BodyPart], SET] = Field(default_factory=list, max_length=64)
    """Body parts (DICOM Body Part Examined); empty means any."""
    sop_classes: Annotated[list[DicomUID], SET] = Field(default_factory=list, max_length=64)
    """SOP Class UIDs the model reads; empty means any image of the modalities."""


class Gpu(ApiModel):
    """GPUs of each worker."""

    count: Annotated[int, Field(ge=0, le=16)] = 1
    """GPUs per worker (nvidia.com/gpu); 0 runs the model on CPU."""
    product: Annotated[str, Field(max_length=63)] | None = None
    """Required GPU product (the nvidia.com/gpu.product node label), e.g. NVIDIA-H100-80GB-HBM3."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    """Further node labels the worker needs."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations besides the nvidia.com/gpu taint, which is always tolerated when count > 0."""


class TimeWindow(ApiModel):
    """A daily window of time; it wraps past midnight when end is before start."""

    start: ClockTime
    """Start, HH:MM."""
    end: ClockTime
    """End, HH:MM."""


class KeepWarm(ApiModel):
    """Keep one worker running in these windows so urgent studies never wait for a cold start."""

    windows: list[TimeWindow] = Field(default_factory=list, max_length=16)
    """Daily windows; empty means always."""
    time_zone: Annotated[str, Field(max_length=64)] = "UTC"
    """IANA time zone of the windows."""


class Scaling(ApiModel):
    """Autoscaling of the workers on queue depth and GPU utilisation."""

    __rules__: ClassVar = (
        Rule(
            "self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas",
            lambda s: s.min_replicas <= s.max_replicas,
        ),
    )

    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 0
    """Fewest workers; 0 lets the model scale to zero when idle."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 4
    """Most workers."""
    target_queue_depth_per_replica: Annotated[int, Field(ge=1, le=10000)] = 5
    """Waiting jobs one worker is expected to absorb."""
    target_gpu_utilization: Annotated[int, Field(ge=1, le=100, alias="targetGPUUtilization")] = 80
    """GPU utilisation (percent) above which workers are added."""
    scale_down_stabilization_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """How long a lower replica count must persist before workers are removed."""
    keep_warm_for_urgent: KeepWarm | None = None
    """Keep one worker warm in these windows even with an empty queue."""


class Thresholds(ApiModel):
    """Scores at which findings become critical."""

    critical: Ratio = 0.9
    """Score at or above which a finding is critical (stat priority, alert)."""
    findings: dict[str, Ratio] = Field(default_factory=dict, max_length=64)
    """Per-finding thresholds overriding critical, keyed by finding label."""

    def critical_at(self, label: str, score: float) -> bool:
        """A finding `label` with this score is critical."""
        return score >= self.findings.get(label, self.critical)


class InferenceServer(ApiModel):
    """A model server beside the worker that speaks the KServe v2 / Triton HTTP inference
    protocol; the worker sends it pixels instead of running a plugin itself."""

    url: HttpUrl
    """Base URL, e.g. http://localhost:8000 (requests go to /v2/models/{model}/infer)."""
    model: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
    """Model name on the server."""
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300
    """Longest wait for one inference."""


class AIModelSpec(ApiModel):
    """Desired state of an AI model."""

    image: Image
    """Container image of the worker."""
    model: ModelRef
    """The model plugin and version."""
    intended_use: IntendedUse
    """What the model may be given."""
    gpu: Gpu = Field(default_factory=Gpu)
    """GPUs and placement of each worker."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of the worker container."""
    scaling: Scaling = Field(default_factory=Scaling)
    """Autoscaling."""
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None
    """Fixed worker count that overrides the autoscaler; `kubectl scale` sets it. Remove
    it to hand control back to the autoscaler."""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    """When a finding is critical."""
    third_party: bool = False
    """The model is run by a third party: only de-identified data reaches it."""
    inference_server: InferenceServer | None = None
    """A KServe v2 / Triton server that runs the model (a vendor's container beside the
    worker); without it the worker runs the plugin itself."""


class AIModelStatus(Status):
    """Observed state of an AI model."""

    replicas: Annotated[int, Field(ge=0)] | None = None
    """Workers that exist."""
    ready_replicas: Annotated[int, Field(ge=0)] | None = None
    """Workers ready to take jobs."""
    desired_replicas: Annotated[int, Field(ge=0)] | None = None
    """Workers the autoscaler wants."""
    selector: Annotated[str, Field(max_length=1024)] | None = None
    """Label selector of the workers (for the scale subresource)."""
    queue_depth: Annotated[int, Field(ge=0)] | None = None
    """Jobs waiting for this model over every gateway."""
    gpu_utilization: Annotated[float, Field(ge=0, le=100)] | None = None
    """Mean GPU utilisation of the workers, percent."""
    last_scale_time: datetime.datetime | None = None
    """When the replica count last changed."""
    scaling_reason: Annotated[str, Field(max_length=1024)] | None = None
    """Why the last scaling decision was taken."""


class AIModel(ApiModel):
    """An AI algorithm offered in a tenant namespace: its inference workers on GPUs,
    autoscaled on queue depth and GPU utilisation."""

    __rules__: ClassVar = (name_rule("AIModel", MODEL_NAME_MAX, longest(MODEL_SUFFIXES)),)

    api_version: Literal["telerad.io/v1alpha1"] = "telerad.io/v1alpha1"
    kind: Literal["AIModel"] = "AIModel"
    metadata: ObjectMeta
    spec: AIModelSpec
    status: AIModelStatus | None = None
