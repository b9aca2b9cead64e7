"""ImagingSite: one hospital or imaging centre of a tenant, and its DICOM gateway."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from telerad.api.base import SET, ApiModel, Rule, list_map, one_of
from telerad.api.names import SITE_NAME_MAX, SITE_SUFFIXES, longest
from telerad.api.types import (
    AETitle,
    Cidr,
    DNSLabel,
    HttpUrl,
    ObjectMeta,
    Priority,
    Quantity,
    ResourceRequirements,
    SecretKeyRef,
    SecretRef,
    Status,
    name_rule,
)

Port = Annotated[int, Field(ge=1, le=65535)]
Days = Annotated[int, Field(ge=1, le=36500)]


class AllowedCaller(ApiModel):
    """A modality or PACS allowed to open DICOM associations with the site."""

    ae_title: AETitle
    """Calling AE title the peer presents."""
    cidrs: Annotated[list[Cidr], SET] = Field(default_factory=list, max_length=32)
    """Source networks the peer connects from; empty accepts the AE title from anywhere
    the NetworkPolicy lets through."""
    description: Annotated[str, Field(max_length=256)] | None = None
    """Free text for people: which device this is. Never patient data."""


class TLS(ApiModel):
    """TLS for DICOM (and the HTTP port). When set, plain DIMSE connections are refused."""

    secret_name: DNSLabel
    """Secret with tls.crt and tls.key (the site's certificate) and ca.crt (the CA that
    signs client certificates)."""
    require_client_certificate: bool = False
    """Mutual TLS: refuse peers without a certificate signed by ca.crt."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted."""


class HttpAccess(ApiModel):
    """Who may use the site's HTTP API (DICOMweb, jobs, worklist)."""

    token_secret_name: DNSLabel
    """Secret whose keys name the tenant's HTTP clients and whose values are their bearer
    tokens, each `<namespace>.<random>` as `telerad token --tenant <namespace>` prints. A
    token of another namespace is refused with 403."""


class ServiceSpec(ApiModel):
    """How the gateway is exposed."""

    __rules__: ClassVar = (
        Rule(
            "self.type != 'ClusterIP' || !has(self.nodePort)",
            "nodePort needs service type NodePort or LoadBalancer",
            lambda s: s.type != "ClusterIP" or s.node_port is None,
        ),
    )

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Kubernetes Service type."""
    node_port: Annotated[int, Field(ge=30000, le=32767)] | None = None
    """Fixed node port for DICOM (NodePort and LoadBalancer only); chosen by Kubernetes if unset."""
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64
    )
    """Annotations for the Service, e.g. a cloud load balancer's settings."""
    load_balancer_source_ranges: Annotated[list[Cidr], SET] = Field(
        default_factory=list, max_length=64
    )
    """For LoadBalancer: source networks the cloud load balancer admits."""


S3StorageClass = Literal[
    "STANDARD",
    "INTELLIGENT_TIERING",
    "STANDARD_IA",
    "ONEZONE_IA",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
]
COLDNESS: dict[str, int] = {
    "STANDARD": 0,
    "INTELLIGENT_TIERING": 1,
    "STANDARD_IA": 2,
    "ONEZONE_IA": 2,
    "GLACIER_IR": 3,
    "GLACIER": 4,
    "DEEP_ARCHIVE": 5,
}
"""How cold (cheap to keep, slow or dear to read) each S3 storage class is."""
RESTORED_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
"""Classes whose objects must be restored before they are read."""
_COLDNESS_CEL = "{" + ", ".join(f"'{k}': {v}" for k, v in COLDNESS.items()) + "}"


class TierObjectStore(ApiModel):
    """A tier in an S3-compatible bucket: one object per instance version."""

    __rules__: ClassVar = (
        Rule(
            "!(self.storageClass == 'DEEP_ARCHIVE' && self.restoreTier == 'Expedited')",
            "DEEP_ARCHIVE has no Expedited restores: use Standard or Bulk",
            lambda s: not (s.storage_class == "DEEP_ARCHIVE" and s.restore_tier == "Expedited"),
        ),
    )

    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
    """The bucket (the platform's: telerad never creates one)."""
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9!_.*'()/-]*$", max_length=512)] = ""
    """Key prefix of the site's objects in the bucket; a bucket can hold many sites."""
    endpoint: HttpUrl | None = None
    """The S3 endpoint for a server that is not AWS (MinIO, Ceph, versitygw, a cloud's
    S3-compatible service); AWS's own for the region when unset."""
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")] = "us-east-1"
    """The bucket's region: where the site's images are kept (data residency), shown in
    the site's status."""
    storage_class: S3StorageClass = "STANDARD"
    """The class every object of the tier is written in. `GLACIER` and `DEEP_ARCHIVE` are
    for the cold tier only: their objects are restored before they are read (WADO-RS
    answers 202 with `Retry-After` meanwhile)."""
    credentials_secret_ref: SecretRef | None = None
    """Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, mounted read-only into
    the gateway; without it the pod's cloud identity (IRSA, workload identity)."""
    restore_tier: Literal["Expedited", "Standard", "Bulk"] = "Standard"
    """How fast (and at what price) archived objects are restored."""
    restore_days: Annotated[int, Field(ge=1, le=365)] = 7
    """Days a restored copy stays readable."""

    @property
    def url(self) -> str:
        """`s3://BUCKET/PREFIX`, as the gateway's configuration and the status name it."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


class Tier(ApiModel):
    """A storage tier: a PersistentVolumeClaim of the tenant's storage class, or a
    location in an object store."""

    __rules__: ClassVar = (
        Rule(
            "has(self.storageClassName) == has(oldSelf.storageClassName) && "
            "(!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
            "storageClassName is immutable: a tier's volume cannot move to another storage class",
        ),
        Rule(
            "has(self.objectStore) == has(oldSelf.objectStore)",
            "a tier cannot change between a volume and an object store: its studies would be"
            " left behind",
        ),
        Rule(
            "!(has(self.objectStore) && has(self.storageClassName))",
            "storageClassName is a volume's: a tier in an object store sets"
            " objectStore.storageClass",
            lambda t: t.object_store is None or t.storage_class_name is None,
        ),
    )

    storage_class_name: DNSLabel | None = None
    """StorageClass of the tier's volume; the cluster default when unset. Immutable."""
    size: Quantity = "100Gi"
    """Capacity requested for the volume. The hot tier refuses stores (out of resources,
    nothing half-written) once its free space is below a twentieth of this size, at most
    1 GiB. With `objectStore` on the hot tier, the volume still holds the data sets being
    received, the embedded catalog (without `spec.catalog`) and the de-identification key;
    the other tiers in an object store have no volume."""
    object_store: TierObjectStore | None = None
    """Keep the tier's instances in an S3-compatible bucket instead of the volume."""
    days: Days = 7
    """Age in days (since the study's last instance) at which a study moves on from this
    tier to the next one the site has; the last tier keeps it until `retentionDays`."""


class StorageEncryption(ApiModel):
    """Encryption at rest: every stored instance sealed with AES-256-GCM under a data key
    of its own, wrapped by a key encryption key from a Secret (docs/encryption.md)."""

    key_secret_ref: SecretRef
    """Secret holding the key encryption keys: one key per key id (base64 of 32 bytes),
    and `current` naming the one that wraps new data keys. Add a key and point `current`
    at it to rotate, without a restart; keep the old keys until `telerad storage rewrap`
    has moved every object to the new one."""


class Storage(ApiModel):
    """Where received studies and results live, and for how long."""

    __rules__: ClassVar = (
        Rule(
            "self.hot.days <= self.retentionDays",
            "hot.days must not exceed retentionDays",
            lambda s: s.hot.days <= s.retention_days,
        ),
        Rule(
            "!has(self.warm) || !has(self.cold) || (self.hot.days < self.warm.days &&"
            " self.warm.days <= self.retentionDays)",
            "tier ages must increase: hot.days < warm.days <= retentionDays",
            lambda s: (
                s.warm is None or s.cold is None or s.hot.days < s.warm.days <= s.retention_days
            ),
        ),
        Rule(
            "!has(self.warm) || !has(self.cold) || !has(self.warm.objectStore) ||"
            f" !has(self.cold.objectStore) || {_COLDNESS_CEL}[self.cold.objectStore.storageClass]"
            f" > {_COLDNESS_CEL}[self.warm.objectStore.storageClass]",
            "the cold tier needs a colder storage class than the warm one",
            lambda s: (
                s.warm is None
                or s.cold is None
                or s.warm.object_store is None
                or s.cold.object_store is None
                or COLDNESS[s.cold.object_store.storage_class]
                > COLDNESS[s.warm.object_store.storage_class]
            ),
        ),
        Rule(
            "!(has(self.hot.objectStore) && self.hot.objectStore.storageClass in"
            f" {list(RESTORED_CLASSES)}) && !(has(self.warm) && has(self.warm.objectStore) &&"
            f" self.warm.objectStore.storageClass in {list(RESTORED_CLASSES)})",
            "GLACIER and DEEP_ARCHIVE are for the cold tier: hot and warm are read at once",
            lambda s: all(
                t is None
                or t.object_store is None
                or t.object_store.storage_class not in RESTORED_CLASSES
                for t in (s.hot, s.warm)
            ),
        ),
    )

    hot: Tier = Field(default_factory=Tier)
    """Fast tier every study lands in; also holds the catalog and job queue."""
    warm: Tier | None = None
    """Cheaper tier studies move to at `hot.days`."""
    cold: Tier | None = None
    """Archive tier studies move to at `warm.days` (at `hot.days` without a warm tier),
    typically a bucket in an archive storage class. Without warm and cold, studies stay
    hot until `retentionDays`."""
    retention_days: Days = 30
    """Days after which a study is deleted from every tier."""
    reclaim_policy: Literal["Retain", "Delete"] = "Retain"
    """What happens to the tiers' volumes when the ImagingSite is deleted: Retain keeps
    them (released from the site, for an archive or a new site to take over), Delete
    removes them with the site."""
    encryption: StorageEncryption | None = None
    """Encrypt every stored instance at rest; without it, instances are stored as
    received (on the volume's own encryption, if any)."""


class Catalog(ApiModel):
    """The site's catalog in the tenant's PostgreSQL."""

    secret_ref: SecretRef
    """Secret with the database's address and credentials, the keys of CloudNativePG's
    `<cluster>-app` Secret: `uri` (`postgresql://USER:PASSWORD@HOST:PORT/DB`, its query may
    set `sslmode`), or `host`, `port`, `dbname`, `user` and `password`; optionally
    `sslmode`, and `ca.crt` for the CA the server's certificate must chain to (then
    `sslmode` defaults to `verify-full`). Mounted read-only into the gateway at
    /var/run/telerad/catalog; the operator never reads it."""


class Completion(ApiModel):
    """When a study counts as complete and is routed."""

    quiet_seconds: Annotated[int, Field(ge=1, le=86400)] = 30
    """Seconds without a new instance after which a study is complete."""


class DicomPeer(ApiModel):
    """A DICOM C-STORE peer (a PACS)."""

    host: Annotated[str, Field(min_length=1, max_length=253)]
    """Host name or address."""
    port: Port = 104
    """DICOM port."""
    ae_title: AETitle
    """The peer's (called) AE title."""
    tls: bool = False
    """Connect with TLS."""


class DicomWebPeer(ApiModel):
    """A DICOMweb STOW-RS endpoint."""

    url: HttpUrl
    """Base URL of the DICOMweb service (STOW-RS goes to {url}/studies)."""
    token_secret: SecretKeyRef | None = None
    """Secret key holding a bearer token for the endpoint."""


class Destination(ApiModel):
    """Where AI results are forwarded; exactly one of dicom or dicomweb."""

    __rules__: ClassVar = (
        one_of("dicom", "dicomweb", "a destination sets exactly one of dicom or dicomweb"),
    )

    name: DNSLabel
    """Unique name of the destination within the site."""
    dicom: DicomPeer | None = None
    """Send results with C-STORE."""
    dicomweb: DicomWebPeer | None = None
    """Send results with STOW-RS."""


class Webhook(ApiModel):
    """An HTTP endpoint that receives critical-finding alerts."""

    name: DNSLabel
    """Unique name of the webhook within the site."""
    url: HttpUrl
    """Receives a JSON POST per alert, signed when a secret is set."""
    signing_secret: SecretKeyRef | None = None
    """Secret key with the HMAC-SHA256 key that signs each request."""
    min_priority: Priority = Priority.ROUTINE
    """Lowest priority of the routing rule behind a critical finding that triggers this
    webhook. Every critical finding by default: one on a routine study is the case a
    triage AI exists to catch, so narrowing a pager to stat rules is an explicit choice."""


class Notifications(ApiModel):
    """Who hears about critical findings."""

    webhooks: Annotated[list[Webhook], list_map("name")] = Field(
        default_factory=list, max_length=16
    )
    """Webhooks called for critical findings."""


class Dimse(ApiModel):
    """DICOM upper-layer limits of the receiver."""

    max_associations: Annotated[int, Field(ge=1, le=1024)] = 32
    """Concurrent associations accepted; more are rejected (transient)."""
    max_pdu_length: Annotated[int, Field(ge=4096, le=4194304, alias="maxPDULength")] = 262144
    """Largest PDU the receiver accepts, in bytes."""


DRAIN_SECONDS = 20
"""What running associations get by default once a stopping gateway stops accepting."""


class Gateway(ApiModel):
    """The site's gateway pods: how many, and how they stop."""

    replicas: Annotated[int, Field(ge=1, le=16)] | None = None
    """Gateway pods serving the site together behind its Service. The default is 2 where
    they can (the site `shared`: its catalog in PostgreSQL, its hot tier in an object store,
    and a de-identification key they share), else 1: a catalog in SQLite or a hot tier on a
    volume has one writer, and such a site rolls out by stopping its gateway first."""
    drain_seconds: Annotated[int, Field(ge=1, le=3600)] = DRAIN_SECONDS
    """How long a stopping gateway (a rollout, its node drained) lets running associations
    and requests finish once it has stopped being ready; the pod's grace period follows."""
    deidentification_key_ref: SecretKeyRef | None = None
    """The key behind the pseudonyms of de-identified copies (64 hex digits from a secure
    source, e.g. `openssl rand -hex 32`), which every gateway of the site must share.
    Without it the gateway keeps one of its own on the hot tier's volume."""


def unshared(spec: ImagingSiteSpec) -> list[str]:
    """What keeps several gateways from serving the site: what they would write on one
    pod's volume, by the field that would move it off (none: the site is shared)."""
    return [
        what
        for what, absent in (
            ("spec.catalog (the catalog is SQLite)", spec.catalog is None),
            ("spec.storage.hot.objectStore", spec.storage.hot.object_store is None),
            ("spec.gateway.deidentificationKeyRef", spec.gateway.deidentification_key_ref is None),
        )
        if absent
    ]


def shared(spec: ImagingSiteSpec) -> bool:
    """Whether several gateways can serve the site."""
    return not unshared(spec)


class ImagingSiteSpec(ApiModel):
    """Desired state of an imaging site."""

    __rules__: ClassVar = (
        Rule(
            "!has(self.gateway) || !has(self.gateway.replicas) || self.gateway.replicas == 1"
            " || (has(self.catalog) && has(self.storage) && has(self.storage.hot)"
            " && has(self.storage.hot.objectStore)"
            " && has(self.gateway.deidentificationKeyRef))",
            "more than one gateway needs spec.catalog (PostgreSQL), spec.storage.hot.objectStore"
            " and spec.gateway.deidentificationKeyRef: nothing they write may be on one pod's"
            " volume",
            lambda s: (s.gateway.replicas or 1) == 1 or shared(s),
        ),
    )

    ae_title: AETitle
    """The site's own (called) AE title that modalities send to."""
    port: Port = 11112
    """DICOM port of the Service."""
    http_port: Port = 8080
    """HTTP port of the Service: DICOMweb, job API, metrics."""
    allowed_callers: Annotated[list[AllowedCaller], list_map("aeTitle")] = Field(
        min_length=1, max_length=256
    )
    """Calling AE titles (and optionally source networks) allowed to send. Everyone else
    is rejected at association time."""
    tls: TLS | None = None
    """TLS for DICOM and HTTP; when set, plain connections are refused."""
    access: HttpAccess | None = None
    """Bearer tokens of the HTTP clients; without it DICOMweb and the job API answer 401
    (metrics and health stay open)."""
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """How the gateway is exposed."""
    storage: Storage = Field(default_factory=Storage)
    """Storage tiers and retention."""
    catalog: Catalog | None = None
    """The catalog (studies, jobs, outbox, audit trail) in the tenant's PostgreSQL;
    without it, SQLite on the hot tier. The database is the platform's, never installed
    by telerad. Two ways to provide it: a CloudNativePG Cluster, naming its
    `<cluster>-app` Secret (`secretRef: {name: tenant-db-app}`); or a managed database
    (RDS, Cloud SQL, Azure), naming a Secret you create with `uri`, or with `host`,
    `port`, `dbname`, `user` and `password` (and `ca.crt` to verify the server). See
    docs/catalog.md. `Degraded` (`CatalogUnavailable`) when the gateway cannot reach it."""
    completion: Completion = Field(default_factory=Completion)
    """When a study counts as complete."""
    destinations: Annotated[list[Destination], list_map("name")] = Field(
        default_factory=list, max_length=16
    )
    """Where AI results are forwarded besides being stored with the study."""
    notifications: Notifications = Field(default_factory=Notifications)
    """Alerts for critical findings."""
    dimse: Dimse = Field(default_factory=Dimse)
    """DICOM receiver limits."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Compute resources of the gateway container."""
    gateway: Gateway = Field(default_factory=Gateway)
    """The gateway pods: replicas, drain, shared key."""

    @property
    def gateway_replicas(self) -> int:
        return self.gateway.replicas or (2 if shared(self) else 1)


class TierStatus(ApiModel):
    """Where one of the site's tiers keeps its images."""

    name: Annotated[str, Field(max_length=8)]
    """The tier: hot, warm or cold."""
    location: Annotated[str, Field(max_length=600)]
    """`volume` (the tier's PersistentVolumeClaim), or `s3://BUCKET/PREFIX`."""
    region: Annotated[str, Field(max_length=64)] | None = None
    """The bucket's region (data residency); none for a volume, which is where the cluster
    is."""
    storage_class: Annotated[str, Field(max_length=64)] | None = None
    """The S3 storage class its objects are written in."""


class ImagingSiteStatus(Status):
    """Observed state of an imaging site."""

    tiers: Annotated[list[TierStatus], Field(max_length=3)] = Field(default_factory=list)
    """Where each tier keeps the site's images, and in which region."""

    endpoint: Annotated[str, Field(max_length=512)] | None = None
    """Where modalities send: host:port and AE title."""
    studies_received: Annotated[int, Field(ge=0)] | None = None
    """Studies received since the gateway started."""
    jobs_queued: Annotated[int, Field(ge=0)] | None = None
    """Inference jobs waiting."""
    gateways: Annotated[str, Field(max_length=256)] | None = None
    """How many gateway pods serve the site, and why not more where it is one."""


class ImagingSite(ApiModel):
    """A hospital or imaging centre of a tenant: its DICOM gateway, storage and network
    policy."""

    __rules__: ClassVar = (name_rule("ImagingSite", SITE_NAME_MAX, longest(SITE_SUFFIXES)),)

    api_version: Literal["telerad.io/v1alpha1"] = "telerad.io/v1alpha1"
    kind: Literal["ImagingSite"] = "ImagingSite"
    metadata: ObjectMeta
    spec: ImagingSiteSpec
    status: ImagingSiteStatus | None = None
