"""Runtime configuration: what the operator renders into a site's ConfigMap and a
model's worker, and what the gateway and worker load. One definition for both sides;
spec parts are reused as they are, so a field means the same thing everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import ConfigDict, Field, field_validator
from pydantic.alias_generators import to_snake

from telerad.api.aimodel import InferenceServer, IntendedUse, ModelRef, Thresholds
from telerad.api.base import ApiModel, Rule
from telerad.api.routing import Match
from telerad.api.site import (
    DRAIN_SECONDS,
    AllowedCaller,
    Completion,
    Destination,
    Dimse,
    Notifications,
)
from telerad.api.types import AETitle, DNSLabel, HttpUrl, Priority

Port = Annotated[int, Field(ge=1, le=65535)]


class TLSFiles(ApiModel):
    """TLS material as files mounted from the site's Secret."""

    cert_file: Path
    """PEM certificate chain of the gateway."""
    key_file: Path
    """PEM private key of the gateway."""
    ca_file: Path | None = None
    """PEM CA bundle that client certificates must chain to."""
    require_client_certificate: bool = False
    """Refuse peers without a valid client certificate."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted."""


HOT, WARM, COLD = "hot", "warm", "cold"
TIERS = (HOT, WARM, COLD)
"""The tiers a study passes through as it ages, in order."""

MIN_FREE_BYTES = 1 << 30
SHARED_SWEEP_GRACE_S = 900
"""Age of a left-over file a gateway sharing its catalog removes at start: a store's
bytes arrive within the DIMSE and HTTP deadlines (minutes), and its commit follows."""
"""The hot tier's free-space watermark unless the site's size says less."""


class Encryption(ApiModel):
    """Encryption at rest (AES-256-GCM, a data key per object, wrapped by the key
    encryption key): docs/encryption.md."""

    key_dir: Path
    """The keyring: a directory (a mounted Secret) with one file per key id, each the key
    as base64 of 32 bytes, and `current` naming the key that wraps new objects' data keys.
    Keys that are not current stay to open older objects."""


S3_URL = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$"
"""A bucket (S3's naming rules) and an optional key prefix."""


class ObjectStore(ApiModel):
    """A tier in an S3-compatible object store: one object per instance version."""

    __rules__: ClassVar = (
        Rule(
            "!(has(self.credentialsFile) && has(self.credentialsDir))",
            "credentials come from credentialsFile or credentialsDir, not both",
            lambda s: s.credentials_file is None or s.credentials_dir is None,
        ),
    )

    url: str = Field(pattern=S3_URL)
    """`s3://BUCKET/PREFIX`: objects are named `PREFIX/studies/STUDY/SERIES/SOP[.vN].dcm`."""
    endpoint: HttpUrl | None = None
    """The S3 endpoint (`http://HOST:PORT` for a server of one's own); AWS's for the
    region when unset."""
    region: str = Field(default="us-east-1", pattern=r"^[a-z0-9-]{1,32}$")
    """Where the bucket is (data residency)."""
    storage_class: str | None = Field(default=None, pattern=r"^[A-Z_]{1,32}$")
    """The S3 storage class of the tier's objects (`STANDARD`, `STANDARD_IA`,
    `GLACIER_IR`, ...), sent with every PUT. In `GLACIER` or `DEEP_ARCHIVE` an object must be
    restored before it is read: WADO-RS answers 202 with `Retry-After` and starts it."""
    restore_tier: Literal["Expedited", "Standard", "Bulk"] = "Standard"
    """How fast (and at what price) archived objects are restored (S3's retrieval tiers)."""
    restore_days: int = Field(default=7, ge=1, le=365)
    """Days a restored copy stays readable before it is archived again."""
    credentials_file: Path | None = None
    """A file of `AWS_ACCESS_KEY_ID=...` and `AWS_SECRET_ACCESS_KEY=...` lines; without it
    (or `credentialsDir`), the standard AWS environment variables or the pod's identity."""
    credentials_dir: Path | None = None
    """A mounted Secret with the keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, a
    file each (what the operator mounts from `objectStore.credentialsSecretRef`)."""

    @property
    def bucket(self) -> str:
        return self.url.removeprefix("s3://").partition("/")[0]

    @property
    def prefix(self) -> str:
        return self.url.removeprefix("s3://").partition("/")[2].strip("/")


def _at_most_one(first: str, second: str) -> Rule:
    a, b = to_snake(first), to_snake(second)
    return Rule(
        f"!(has(self.{first}) && has(self.{second}))",
        f"a tier is a directory or an object store: {first} or {second}, not both",
        lambda s: getattr(s, a) is None or getattr(s, b) is None,
    )


class StoragePaths(ApiModel):
    """The site's tiers: hot, and optionally warm and cold, each a mounted directory or a
    location in an object store. A study moves on as it ages (hot -> warm -> cold, skipping
    a tier the site lacks) and is deleted from every tier after `retentionDays`."""

    __rules__: ClassVar = (
        _at_most_one("warmDir", "warmStore"),
        _at_most_one("coldDir", "coldStore"),
        Rule(
            "self.hotDays <= self.retentionDays",
            "hotDays must not exceed retentionDays",
            lambda s: s.hot_days <= s.retention_days,
        ),
        Rule(
            "!((has(self.warmDir) || has(self.warmStore)) && (has(self.coldDir) ||"
            " has(self.coldStore))) || (self.hotDays < self.warmDays &&"
            " self.warmDays <= self.retentionDays)",
            "with a warm and a cold tier, ages increase: hotDays < warmDays <= retentionDays",
            lambda s: (
                not (s.has(WARM) and s.has(COLD)) or s.hot_days < s.warm_days <= s.retention_days
            ),
        ),
    )

    hot_dir: Path
    """Hot tier: instances, the catalog and the job queue. With `hotStore`, where data
    sets are received before they go to the bucket (and the embedded catalog)."""
    hot_store: ObjectStore | None = None
    """Keep the hot tier's instances in an object store instead of `hotDir`."""
    warm_dir: Path | None = None
    """Warm tier, when the site has one, as a directory."""
    warm_store: ObjectStore | None = None
    """Warm tier, when the site has one, in an object store."""
    cold_dir: Path | None = None
    """Cold (archive) tier, when the site has one, as a directory."""
    cold_store: ObjectStore | None = None
    """Cold (archive) tier, when the site has one, in an object store (an archive storage
    class, restored before it is read when the class needs it)."""
    hot_days: int = Field(default=7, ge=1)
    """Age in days at which a study leaves the hot tier (for warm, else cold)."""
    warm_days: int = Field(default=30, ge=1)
    """Age in days at which a study leaves the warm tier for the cold one."""
    retention_days: int = Field(default=30, ge=1)
    """Days before deletion from every tier."""
    min_free_bytes: int = Field(default=MIN_FREE_BYTES, ge=0)
    """Below this much free space on the hot tier, stores are refused (out of resources)
    rather than half-written."""
    sweep_grace_seconds: int | None = Field(default=None, ge=0, le=86400)
    """At start, a gateway removes what a crash left in its tiers (staged files, files
    never catalogued) that was last written longer ago than this: younger ones may be the
    stores in flight of another gateway of the site. Default: 0 with an SQLite catalog
    (one gateway per site), `SHARED_SWEEP_GRACE_S` with a shared one."""
    lifecycle_interval_seconds: int = Field(default=300, ge=1, le=86400)
    """How often the hot -> warm -> deleted pass runs."""
    encryption: Encryption | None = None
    """Seal every stored instance with AES-256-GCM; without it, files are stored as
    received."""

    def has(self, tier: str) -> bool:
        """Whether the site has the tier (`hot`, `warm` or `cold`)."""
        return tier == HOT or self.place(tier) != (None, None)

    def place(self, tier: str) -> tuple[Path | None, ObjectStore | None]:
        """Where a tier is: its directory, or its object store (the other is None)."""
        return {
            HOT: (None if self.hot_store else self.hot_dir, self.hot_store),
            WARM: (self.warm_dir, self.warm_store),
            COLD: (self.cold_dir, self.cold_store),
        }[tier]

    def moves_on(self, tier: str) -> tuple[str, int] | None:
        """The tier a study moves to from `tier`, and the age in days at which it does;
        None where it stays until retention (the last tier the site has)."""
        later = [t for t in TIERS[TIERS.index(tier) + 1 :] if self.has(t)]
        if not later:
            return None
        return later[0], self.hot_days if tier == HOT else self.warm_days


def url_password(url: str) -> bool:
    """Whether a database URL carries a password, in its authority or as libpq's
    `password` query parameter."""
    parts = urlsplit(url)
    return parts.password is not None or "password" in parse_qs(parts.query)


CREDENTIALS_IN_URL = (
    "the catalog URL carries a password: give it in a file instead (passwordFile, "
    "--catalog-password-file), so that no ConfigMap or command line holds it"
)


class CatalogConfig(ApiModel):
    """Where the site's catalog, job queue and outbox live: `url`, `secretDir`, or neither
    (SQLite in the hot tier)."""

    # A refused URL may hold a password: errors never repeat what was given.
    model_config = ApiModel.model_config | ConfigDict(hide_input_in_errors=True)
    __rules__: ClassVar = (
        Rule(
            "!(has(self.url) && has(self.secretDir))",
            "a catalog sets url or secretDir, not both",
            lambda c: c.url is None or c.secret_dir is None,
        ),
        Rule(
            "!(has(self.secretDir) && has(self.passwordFile))",
            "with secretDir the password is the Secret's own `password` key: no passwordFile",
            lambda c: c.secret_dir is None or c.password_file is None,
        ),
    )

    url: str | None = Field(default=None, pattern=r"^(sqlite|postgresql|postgres)://")
    """`sqlite:///PATH` (one gateway per site; the default is `catalog.sqlite` in the hot
    tier) or `postgresql://USER@HOST:PORT/DB?sslmode=verify-full&sslrootcert=CA` (shared by
    the site's gateways and by other sites of the tenant). Never a password: that comes
    from `passwordFile`."""
    password_file: Path | None = None
    """The database password, from the mounted Secret."""
    secret_dir: Path | None = None
    """A mounted Secret with the keys of CloudNativePG's `<cluster>-app` Secret: `uri`, or
    `host`, `port`, `dbname`, `user` and `password`; optionally `sslmode`, and `ca.crt`, the
    CA the server's certificate must chain to. The operator mounts `spec.catalog.secretRef`
    here."""

    @field_validator("url")
    @classmethod
    def _no_password(cls, url: str | None) -> str | None:
        if url is not None and url_password(url):
            raise ValueError(CREDENTIALS_IN_URL)
        return url

    @property
    def shared(self) -> bool:
        """Whether other gateways may use the catalog too (PostgreSQL, not SQLite)."""
        return self.secret_dir is not None or not (self.url or "sqlite:").startswith("sqlite:")


class DimseTimeouts(ApiModel):
    """How long a DICOM peer may keep the receiver waiting. Each bound frees what a slow or
    silent peer holds (a connection, an association slot, the association's thread): a
    timeout per read alone lets a peer that sends a byte now and then hold them for ever."""

    associate_seconds: float = Field(default=30, gt=0, le=3600)
    """From the TCP accept to the last byte of the A-ASSOCIATE-RQ, the TLS handshake
    included: one deadline for the whole request, however its bytes trickle in."""
    message_seconds: float = Field(default=30, gt=0, le=3600)
    """How long one DIMSE message (or a PDU between messages) may keep the receiver waiting
    for its bytes, besides the time its bytes earn at `minBytesPerSecond`. Only time spent
    waiting on the peer counts, never the receiver's own (writing to disk)."""
    min_bytes_per_second: int = Field(default=1024, ge=1, le=1 << 30)
    """The slowest a message may arrive once `messageSeconds` are spent: far below any real
    link (a large data set over a slow line earns its time), it cuts trickles."""
    idle_seconds: float = Field(default=120, gt=0, le=86400)
    """How long an association may be silent between messages before it is aborted."""


def backoff(policy: JobPolicy | DeliveryPolicy, attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: doubling from the policy's
    backoff, capped at its maximum."""
    return min(policy.max_backoff_seconds, policy.backoff_seconds * 2.0 ** (attempts - 1))


class JobPolicy(ApiModel):
    """Retries of failed jobs."""

    max_attempts: int = Field(default=5, ge=1, le=100)
    """Claims before a failing job (or one whose worker keeps vanishing) is parked."""
    backoff_seconds: int = Field(default=10, ge=0, le=3600)
    """Wait before the first retry; doubled for each further attempt."""
    max_backoff_seconds: int = Field(default=600, ge=0, le=86400)
    """Longest wait between retries."""


class DeliveryPolicy(ApiModel):
    """Retries of critical-finding webhooks and result forwarding."""

    max_attempts: int = Field(default=30, ge=1, le=1000)
    """Attempts before a delivery is parked (kept, with its error, for a person to see)."""
    backoff_seconds: int = Field(default=2, ge=0, le=3600)
    """Wait before the second attempt; doubled for each after it."""
    max_backoff_seconds: int = Field(default=600, ge=0, le=86400)
    """Longest wait between attempts."""


class ModelRoute(ApiModel):
    """A model a compiled rule sends studies to, with what the gateway must know of it."""

    name: DNSLabel
    """AIModel name; jobs are queued under it."""
    third_party: bool = False
    """Only de-identified data may be served to it."""
    intended_use: IntendedUse
    """What the model may be given."""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    """When its findings are critical."""


class CompiledRule(ApiModel):
    """A routing rule resolved against its policy and models, in evaluation order."""

    policy: DNSLabel
    """RoutingPolicy the rule comes from."""
    name: DNSLabel
    """Rule name within the policy."""
    match: Match = Field(default_factory=Match)
    """Which studies the rule takes."""
    models: list[ModelRoute] = Field(min_length=1)
    """Models that receive a job per matching study."""
    priority: Priority = Priority.ROUTINE
    """Priority of the jobs."""
    deidentify: bool = False
    """De-identify for every model of the rule."""
    notify: bool = True
    """Send critical findings to the site's webhooks."""


class HttpLimits(ApiModel):
    """How long the HTTP port waits for what a client announced."""

    body_timeout_seconds: float = Field(default=30, gt=0, le=3600)
    """A request body that brings fewer than `minBodyBytesPerSecond` times this many bytes
    in any window this long is cut off (408, connection closed): a client that announces a
    large body and stops sending holds its connection no longer."""
    min_body_bytes_per_second: int = Field(default=1024, ge=1, le=1 << 30)
    """The slowest body accepted, averaged over each window."""


UNREADY_SECONDS = 5.0
"""Longer than an endpoint change takes to reach kube-proxy and cloud load balancers that
watch the pod's readiness (a second or two)."""


class GatewayConfig(ApiModel):
    """Everything a site gateway needs; rendered by the operator into the site's ConfigMap."""

    # Its catalog URL may hold a password by mistake: errors never repeat what was given.
    model_config = ApiModel.model_config | ConfigDict(hide_input_in_errors=True)

    site: DNSLabel
    """ImagingSite name (used in metric labels and logs)."""
    namespace: DNSLabel = "default"
    """Tenant namespace."""
    ae_title: AETitle
    """Called AE title of the receiver."""
    dicom_port: Port = 11112
    """Port the DICOM receiver listens on."""
    http_port: Port = 8080
    """Port of DICOMweb, the job API, metrics and health."""
    bind_address: str = "0.0.0.0"  # noqa: S104  (a pod listens on its own interface)
    """Address both listeners bind."""
    allowed_callers: list[AllowedCaller] = Field(min_length=1)
    """Who may send."""
    tls: TLSFiles | None = None
    """TLS material; when set, plain connections are refused."""
    storage: StoragePaths
    """Tier directories and ages."""
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    """The catalog's database."""
    completion: Completion = Field(default_factory=Completion)
    """When a study is complete."""
    dimse: Dimse = Field(default_factory=Dimse)
    """Receiver limits."""
    dimse_timeouts: DimseTimeouts = Field(default_factory=DimseTimeouts)
    """Deadlines of DICOM peers: for the association request, each message, and silence."""
    jobs: JobPolicy = Field(default_factory=JobPolicy)
    """Retries of failed jobs."""
    receivers: int | None = Field(default=None, ge=1, le=64)
    """Processes serving the DICOM port; default one per CPU the gateway may run on."""
    unready_seconds: float = Field(default=UNREADY_SECONDS, ge=0, le=300)
    """On SIGTERM, how long the gateway goes on accepting while /readyz says it is not
    ready, so that its Service (or load balancer) stops sending to it before it stops
    accepting: a connection sent meanwhile is served, not refused."""
    drain_seconds: int = Field(default=DRAIN_SECONDS, ge=1, le=3600)
    """Then, how long running associations may go on once it has stopped accepting; the
    pod's grace period covers both."""
    deidentification_key_file: Path | None = None
    """The key behind the pseudonyms of de-identified copies (a mounted Secret's key, the
    same for every gateway of the site); default `<hotDir>/deid.key`, made on first use."""
    routing: list[CompiledRule] = Field(default_factory=list)
    """Rules of every policy that selects this site, in order."""
    destinations: list[Destination] = Field(default_factory=list)
    """Where results are forwarded."""
    public_url: HttpUrl | None = None
    """Base URL clients reach the HTTP port at, for the URLs in DICOMweb answers; by
    default the Host each request names."""
    tokens_dir: Path | None = None
    """The mounted token Secret: each file is one HTTP client, its name the client's name
    (written to the audit log) and its content the bearer token. Without it, DICOMweb and
    the job API refuse every request."""
    secrets_dir: Path | None = None
    """Where the Secrets that destinations name are mounted, as `<secret>/<key>`."""
    audit_dir: Path | None = None
    """Where the audit trail's day files go (one JSON-lines file per UTC day) beside an
    SQLite catalog; default `<hotDir>/audit`. A PostgreSQL catalog keeps the trail in its
    `audit` table instead, and this is not used."""
    notifications: Notifications = Field(default_factory=Notifications)
    """Critical-finding webhooks."""
    delivery: DeliveryPolicy = Field(default_factory=DeliveryPolicy)
    """Retries of webhooks and result forwarding."""
    http: HttpLimits = Field(default_factory=HttpLimits)
    """Deadlines of request bodies on the HTTP port."""

    @property
    def sweep_grace_seconds(self) -> int:
        """How old a left-over file must be for the start-up sweep to remove it."""
        if self.storage.sweep_grace_seconds is not None:
            return self.storage.sweep_grace_seconds
        return SHARED_SWEEP_GRACE_S if self.catalog.shared else 0


class GatewayEndpoint(ApiModel):
    """A gateway a worker claims jobs from."""

    site: DNSLabel
    """ImagingSite name."""
    url: HttpUrl
    """Base URL of the gateway's HTTP port."""
    token_file: Path | None = None
    """File holding the bearer token of the site's tenant (a mounted Secret key); re-read
    on every request, so a rotated Secret is picked up."""
    ca_file: Path | None = None
    """CA bundle that signs the gateway's HTTPS certificate; default: the system's."""


class WorkerConfig(ApiModel):
    """Everything an inference worker needs; rendered by the operator per AIModel."""

    model: ModelRef
    """Plugin and version to load."""
    name: DNSLabel | None = None
    """AIModel whose jobs it claims (gateways queue jobs under the AIModel's name, which
    need not be the plugin's); default: the plugin's name."""
    gateways: list[GatewayEndpoint] = Field(default_factory=list)
    """Gateways whose routing sends jobs to this model."""
    third_party: bool = False
    """Fetch only de-identified studies."""
    thresholds: Thresholds = Field(default_factory=Thresholds)
    """When a finding is critical."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto uses a GPU when one is present."""
    lease_seconds: int = Field(default=60, ge=5, le=3600)
    """Lease of a claimed job; extended while the worker runs."""
    metrics_port: Port = 9090
    """Port of /metrics and /healthz."""
    bind_address: str = "0.0.0.0"  # noqa: S104  (a pod listens on its own interface)
    """Address of the metrics port."""
    poll_seconds: float = Field(default=1.0, gt=0, le=60)
    """Wait between claims when no gateway has work."""
    owner: Annotated[str, Field(max_length=200)] | None = None
    """Identity on the leases; default: the host name (the pod name)."""
    inference_server: InferenceServer | None = None
    """Run the model on this server instead of in the worker (the model's name and version
    above still go into every result)."""
