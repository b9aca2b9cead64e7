"""An ImagingSite's children: gateway ConfigMap, Deployment, Service, PVCs,
NetworkPolicy and ServiceAccount."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from telerad.api import names
from telerad.api.config import (
    COLD,
    HOT,
    MIN_FREE_BYTES,
    UNREADY_SECONDS,
    WARM,
    CatalogConfig,
    CompiledRule,
    Encryption,
    GatewayConfig,
    ObjectStore,
    StoragePaths,
    TLSFiles,
)
from telerad.api.site import ImagingSite, Tier, TierStatus, shared, unshared
from telerad.api.types import quantity_bytes
from telerad.operator.builders.common import (
    CONFIG_HASH_ANNOTATION,
    CONTAINER_SECURITY,
    POD_SECURITY,
    Manifest,
    config_hash,
    metadata,
    resources,
)
from telerad.operator.settings import OperatorSettings

COMPONENT = "gateway"
DICOM_PORT = 11112
HTTP_PORT = 8080
CONFIG_DIR = Path("/etc/telerad")
CONFIG_FILE = "gateway.yaml"
TLS_DIR = CONFIG_DIR / "tls"
TOKENS_DIR = CONFIG_DIR / "tokens"
SECRETS_DIR = CONFIG_DIR / "secrets"
DATA_DIR = Path("/var/lib/telerad")
CATALOG_DIR = Path("/var/run/telerad/catalog")
KEYS_DIR = Path("/var/run/telerad/keys")
S3_DIR = Path("/var/run/telerad/s3")
DEID_DIR = Path("/var/run/telerad/deid")
DEID_FILE = "key"
# After the drain: the outbox, the catalog and the audit trail close.
STOP_MARGIN_S = 10
ZONE = "topology.kubernetes.io/zone"
HOSTNAME = "kubernetes.io/hostname"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
TIER_LABEL = f"{names.GROUP}/tier"


def gateway_config(site: ImagingSite, namespace: str, rules: list[CompiledRule]) -> GatewayConfig:
    spec = site.spec
    tls = None
    if spec.tls is not None:
        tls = TLSFiles(
            cert_file=TLS_DIR / "tls.crt",
            key_file=TLS_DIR / "tls.key",
            ca_file=TLS_DIR / "ca.crt",
            require_client_certificate=spec.tls.require_client_certificate,
            min_version=spec.tls.min_version,
        )
    return GatewayConfig(
        site=site.metadata.name,
        namespace=namespace,
        ae_title=spec.ae_title,
        dicom_port=DICOM_PORT,
        http_port=HTTP_PORT,
        allowed_callers=spec.allowed_callers,
        tls=tls,
        storage=StoragePaths(
            hot_dir=DATA_DIR / HOT,
            **_places(site),
            hot_days=spec.storage.hot.days,
            **({"warm_days": spec.storage.warm.days} if spec.storage.warm else {}),
            retention_days=spec.storage.retention_days,
            min_free_bytes=free_space_watermark(spec.storage.hot.size),
            # Only where the Secret is mounted: no key enters the ConfigMap.
            encryption=Encryption(key_dir=KEYS_DIR) if spec.storage.encryption else None,
        ),
        # Only where the Secret is mounted: its content never enters the ConfigMap.
        catalog=CatalogConfig(secret_dir=CATALOG_DIR) if spec.catalog else CatalogConfig(),
        completion=spec.completion,
        dimse=spec.dimse,
        routing=rules,
        destinations=spec.destinations,
        notifications=spec.notifications,
        tokens_dir=TOKENS_DIR if spec.access is not None else None,
        secrets_dir=SECRETS_DIR if _mounted_secrets(site) else None,
        drain_seconds=spec.gateway.drain_seconds,
        deidentification_key_file=(
            DEID_DIR / DEID_FILE if spec.gateway.deidentification_key_ref else None
        ),
    )


def _places(site: ImagingSite) -> dict[str, Path | ObjectStore]:
    """Each tier's directory (its volume's mount) or object store, as StoragePaths names
    them; the hot tier's directory is always there (data sets are received into it)."""
    found: dict[str, Path | ObjectStore] = {}
    for tier, spec in _tiers(site):
        bucket = spec.object_store
        if bucket is None:
            if tier != HOT:
                found[f"{tier}_dir"] = DATA_DIR / tier
            continue
        found[f"{tier}_store"] = ObjectStore(
            url=bucket.url,
            endpoint=bucket.endpoint,
            region=bucket.region,
            storage_class=bucket.storage_class,
            # Only where the Secret is mounted: no key enters the ConfigMap.
            credentials_dir=S3_DIR / tier if bucket.credentials_secret_ref else None,
            restore_tier=bucket.restore_tier,
            restore_days=bucket.restore_days,
        )
    return found


def tier_status(site: ImagingSite) -> list[TierStatus]:
    """Where each tier keeps the site's images (data residency), for the site's status."""
    found = []
    for tier, spec in _tiers(site):
        bucket = spec.object_store
        if bucket is None:
            found.append(TierStatus(name=tier, location="volume"))
        else:
            found.append(
                TierStatus(
                    name=tier,
                    location=bucket.url,
                    region=bucket.region,
                    storage_class=bucket.storage_class,
                )
            )
    return found


def free_space_watermark(size: str) -> int:
    """Free bytes below which the hot tier refuses stores: a twentieth of the volume, at
    most the runtime's 1 GiB default. A fixed 1 GiB refused every store on a 1 Gi tier; a
    fraction leaves a small tier most of its space and still keeps room, as ext4's reserve
    does, for the catalog's journal and the move to the warm tier to commit."""
    return min(MIN_FREE_BYTES, quantity_bytes(size) // 20)


def _mounted_secrets(site: ImagingSite) -> dict[str, list[str]]:
    """Secret name -> the keys the gateway reads (destination tokens, webhook signing
    keys), so only those keys are mounted."""
    refs = [d.dicomweb.token_secret for d in site.spec.destinations if d.dicomweb]
    refs += [hook.signing_secret for hook in site.spec.notifications.webhooks]
    found: dict[str, list[str]] = {}
    for ref in refs:
        if ref is not None and ref.key not in found.setdefault(ref.name, []):
            found[ref.name].append(ref.key)
    return found


def config_map(owner: Manifest, config: GatewayConfig) -> Manifest:
    name = names.site_child(owner["metadata"]["name"], "gateway")
    text = yaml.dump(config.to_wire(), Dumper=yaml.CSafeDumper, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, name, COMPONENT),
        "data": {CONFIG_FILE: text},
    }


def _tiers(site: ImagingSite) -> list[tuple[str, Tier]]:
    storage = site.spec.storage
    found = ((HOT, storage.hot), (WARM, storage.warm), (COLD, storage.cold))
    return [(name, tier) for name, tier in found if tier is not None]


def _volumes(site: ImagingSite) -> list[tuple[str, Tier]]:
    """The tiers that need a PersistentVolumeClaim: those not in an object store, and the
    hot one unless the site is shared (else it holds the embedded catalog, the
    de-identification key, the audit files; a shared site keeps only what is being received
    there, on each pod's own emptyDir)."""
    return [
        (n, t)
        for n, t in _tiers(site)
        if t.object_store is None or (n == HOT and not shared(site.spec))
    ]


def gateways(site: ImagingSite) -> str:
    """The status line saying how many gateways serve the site, and why only one."""
    count = site.spec.gateway_replicas
    if count > 1:
        return f"{count} replicas"
    missing = unshared(site.spec)
    if not missing:
        return "1 replica (spec.gateway.replicas)"
    return "1 replica: more need " + ", ".join(missing)


def deployment(
    owner: Manifest, site: ImagingSite, config: Manifest, settings: OperatorSettings
) -> Manifest:
    site_name = owner["metadata"]["name"]
    name = names.site_child(site_name, "gateway")
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108  (the root filesystem is read-only)
    ]
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    several = shared(site.spec)
    for tier, _ in _volumes(site):
        mounts.append({"name": tier, "mountPath": str(DATA_DIR / tier)})
        volumes.append(
            {
                "name": tier,
                "persistentVolumeClaim": {"claimName": names.site_child(site_name, tier)},
            }
        )
    if several:
        mounts.append({"name": HOT, "mountPath": str(DATA_DIR / HOT)})
        volumes.append({"name": HOT, "emptyDir": {"sizeLimit": site.spec.storage.hot.size}})
    deid = site.spec.gateway.deidentification_key_ref
    if deid is not None:
        mounts.append({"name": "deid", "mountPath": str(DEID_DIR), "readOnly": True})
        items = [{"key": deid.key, "path": DEID_FILE}]
        volumes.append({"name": "deid", "secret": {"secretName": deid.name, "items": items}})
    for tier, spec in _tiers(site):
        ref = spec.object_store.credentials_secret_ref if spec.object_store else None
        if ref is not None:
            volume = f"s3-{tier}"
            mounts.append({"name": volume, "mountPath": str(S3_DIR / tier), "readOnly": True})
            items = [{"key": key, "path": key} for key in S3_KEYS]
            volumes.append({"name": volume, "secret": {"secretName": ref.name, "items": items}})
    if site.spec.tls is not None:
        mounts.append({"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": site.spec.tls.secret_name}})
    if site.spec.access is not None:
        mounts.append({"name": "tokens", "mountPath": str(TOKENS_DIR), "readOnly": True})
        volumes.append(
            {"name": "tokens", "secret": {"secretName": site.spec.access.token_secret_name}}
        )
    if site.spec.catalog is not None:
        mounts.append({"name": "catalog", "mountPath": str(CATALOG_DIR), "readOnly": True})
        secret_name = site.spec.catalog.secret_ref.name
        volumes.append({"name": "catalog", "secret": {"secretName": secret_name}})
    if site.spec.storage.encryption is not None:
        mounts.append({"name": "keys", "mountPath": str(KEYS_DIR), "readOnly": True})
        secret_name = site.spec.storage.encryption.key_secret_ref.name
        volumes.append({"name": "keys", "secret": {"secretName": secret_name}})
    for index, (secret, keys) in enumerate(sorted(_mounted_secrets(site).items())):
        volume = f"secret-{index}"
        mounts.append({"name": volume, "mountPath": str(SECRETS_DIR / secret), "readOnly": True})
        items = [{"key": key, "path": key} for key in keys]
        volumes.append({"name": volume, "secret": {"secretName": secret, "items": items}})
    selector = names.selector_labels(site_name, COMPONENT)
    # With TLS the HTTP port speaks only HTTPS, so the probes must too.
    scheme = "HTTPS" if site.spec.tls is not None else "HTTP"

    def probe(path: str, period: int) -> Manifest:
        get = {"path": path, "port": "http", "scheme": scheme}
        return {"httpGet": get, "periodSeconds": period}

    replicas = site.spec.gateway_replicas
    pod: Manifest = {}
    if replicas > 1:
        # Apart where the nodes allow: one node or one zone lost takes one gateway.
        spread = {"labelSelector": {"matchLabels": selector}}
        pod["affinity"] = {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": {**spread, "topologyKey": HOSTNAME}}
                ]
            }
        }
        pod["topologySpreadConstraints"] = [
            {**spread, "maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": "ScheduleAnyway"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, COMPONENT),
        "spec": {
            "replicas": replicas,
            # A shared site's new gateway is ready before an old one stops; elsewhere one
            # writer per SQLite catalog and volume: never two gateways on it.
            "strategy": (
                {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
                if several
                else {"type": "Recreate"}
            ),
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": names.labels(site_name, COMPONENT),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config["data"])},
                },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": math.ceil(UNREADY_SECONDS)
                    + site.spec.gateway.drain_seconds
                    + STOP_MARGIN_S,
                    **pod,
                    "containers": [
                        {
                            "name": COMPONENT,
                            "image": settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "args": [COMPONENT, "--config", str(CONFIG_DIR / CONFIG_FILE)],
                            "ports": [
                                {"name": "dicom", "containerPort": DICOM_PORT, "protocol": "TCP"},
                                {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                            ],
                            # Ready: accepting associations (not while draining). Live:
                            # the DICOM port serves; a catalog outage or a full disk is
                            # /healthz's (a restart would not mend them).
                            "readinessProbe": probe("/readyz", 5),
                            "livenessProbe": probe("/livez", 10),
                            "resources": resources(site.spec.resources),
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def disruption_budget(owner: Manifest, site: ImagingSite) -> Manifest | None:
    """At most one of several gateways evicted at a time (a node drain, an upgrade). One
    left from when the site had several allows its one gateway's eviction too: harmless."""
    if site.spec.gateway_replicas < 2:
        return None
    site_name = owner["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, names.site_child(site_name, "gateway"), COMPONENT),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": names.selector_labels(site_name, COMPONENT)},
        },
    }


def service(owner: Manifest, site: ImagingSite) -> Manifest:
    site_name = owner["metadata"]["name"]
    svc = site.spec.service
    dicom: Manifest = {
        "name": "dicom",
        "port": site.spec.port,
        "targetPort": "dicom",
        "protocol": "TCP",
    }
    if svc.node_port is not None:
        dicom["nodePort"] = svc.node_port
    spec: Manifest = {
        "type": svc.type,
        "selector": names.selector_labels(site_name, COMPONENT),
        "ports": [
            dicom,
            {"name": "http", "port": site.spec.http_port, "targetPort": "http", "protocol": "TCP"},
        ],
    }
    if svc.type == "LoadBalancer" and svc.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(svc.load_balancer_source_ranges)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(
            owner,
            names.site_child(site_name, "gateway"),
            COMPONENT,
            annotations=dict(svc.annotations) or None,
        ),
        "spec": spec,
    }


def volume_claims(owner: Manifest, site: ImagingSite) -> list[Manifest]:
    site_name = owner["metadata"]["name"]
    # Retained volumes carry no owner reference, so garbage collection leaves them.
    owned = site.spec.storage.reclaim_policy == "Delete"
    claims = []
    for tier, spec in _volumes(site):
        claim_spec: Manifest = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spec.size}},
        }
        if spec.storage_class_name:
            claim_spec["storageClassName"] = spec.storage_class_name
        claims.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": metadata(
                    owner,
                    names.site_child(site_name, tier),
                    COMPONENT,
                    owned=owned,
                    labels={TIER_LABEL: tier},
                ),
                "spec": claim_spec,
            }
        )
    return claims


def network_policy(owner: Manifest, site: ImagingSite, settings: OperatorSettings) -> Manifest:
    site_name = owner["metadata"]["name"]
    callers = site.spec.allowed_callers
    # DICOM only from the callers' networks; when a caller names none, the AE title
    # allow-list alone decides, so the port is open to every source.
    cidrs = sorted({c for caller in callers for c in caller.cidrs})
    dicom_from = [{"ipBlock": {"cidr": c}} for c in cidrs] if all(c.cidrs for c in callers) else []
    dicom_rule: Manifest = {"ports": [{"protocol": "TCP", "port": DICOM_PORT}]}
    if dicom_from:
        dicom_rule["from"] = dicom_from
    http_rule = {
        "ports": [{"protocol": "TCP", "port": HTTP_PORT}],
        "from": [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/component": "worker",
                        "app.kubernetes.io/part-of": names.PART_OF,
                    }
                }
            },
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": settings.monitoring_namespace}
                }
            },
            # The operator's autoscaler reads the queue from the gateways' /metrics.
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}
                },
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "telerad-operator"}},
            },
        ],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, names.site_child(site_name, "gateway"), COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": names.selector_labels(site_name, COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [dicom_rule, http_rule],
        },
    }


def service_account(owner: Manifest) -> Manifest:
    name = names.site_child(owner["metadata"]["name"], "gateway")
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(owner, name, COMPONENT),
        "automountServiceAccountToken": False,
    }


def children(
    owner: Manifest, site: ImagingSite, rules: list[CompiledRule], settings: OperatorSettings
) -> list[Manifest]:
    """Every child of a site, in the order they are applied (dependencies first)."""
    config = config_map(owner, gateway_config(site, owner["metadata"]["namespace"], rules))
    budget = disruption_budget(owner, site)
    return [
        service_account(owner),
        config,
        *volume_claims(owner, site),
        network_policy(owner, site, settings),
        service(owner, site),
        *([budget] if budget is not None else []),
        deployment(owner, site, config, settings),
    ]
