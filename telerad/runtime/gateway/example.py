"""A complete configuration for a local gateway, so a newcomer starts one with two
commands. Its routing matches the worker's reference models (CT head, chest X-ray), so the
two example configs together make a working pipeline."""

from __future__ import annotations

import os
from pathlib import Path

from telerad.api.aimodel import IntendedUse, Thresholds
from telerad.api.config import (
    CatalogConfig,
    CompiledRule,
    Encryption,
    GatewayConfig,
    ModelRoute,
    ObjectStore,
    StoragePaths,
)
from telerad.api.routing import Match
from telerad.api.site import AllowedCaller, Completion
from telerad.api.types import Priority
from telerad.runtime.gateway.access import new_token
from telerad.runtime.store.envelope import CURRENT, add_key

CT_HEAD = ModelRoute(
    name="ct-head-hyperdensity",
    intended_use=IntendedUse(modalities=["CT"], body_parts=["HEAD", "BRAIN"]),
    thresholds=Thresholds(critical=0.8),
)
CHEST_XRAY = ModelRoute(
    name="cxr-opacity",
    intended_use=IntendedUse(modalities=["CR", "DX"], body_parts=["CHEST"]),
)
LOCAL = ["127.0.0.0/8", "::1/128"]
# The calling AE titles that dcmtk's and pynetdicom's tools use unless told otherwise.
LOCAL_SENDERS = ("STORESCU", "ECHOSCU", "FINDSCU", "PYNETDICOM", "TELERAD")


def example_config(
    port: int,
    http_port: int,
    data_dir: Path,
    catalog: CatalogConfig | None = None,
    *,
    hot: ObjectStore | None = None,
    warm: ObjectStore | None = None,
    cold: ObjectStore | None = None,
) -> GatewayConfig:
    """A local site named `example`: gateways given the same catalog URL and data
    directory (each its own ports) are replicas of one site. A tier given an object store
    keeps its instances in that bucket (the data directory still receives them); with a
    cold tier, studies are archived there after 30 days and kept 10 years."""
    data_dir = data_dir.absolute()
    return GatewayConfig(
        site="example",
        namespace="default",
        ae_title="TELERAD",
        dicom_port=port,
        http_port=http_port,
        bind_address="127.0.0.1",
        allowed_callers=[
            AllowedCaller(ae_title=ae, cidrs=LOCAL, description="local tools")
            for ae in LOCAL_SENDERS
        ],
        tokens_dir=data_dir / "tokens",
        storage=StoragePaths(
            hot_dir=data_dir / "hot",
            hot_store=hot,
            warm_dir=None if warm is not None else data_dir / "warm",
            warm_store=warm,
            cold_store=cold,
            hot_days=7,
            warm_days=30,
            retention_days=30 if cold is None else 3650,
            min_free_bytes=256 << 20,
            encryption=Encryption(key_dir=data_dir / "keys"),
        ),
        catalog=catalog or CatalogConfig(),
        completion=Completion(quiet_seconds=5),
        routing=[
            CompiledRule(
                policy="example",
                name="head-ct",
                match=Match(modalities=["CT"], body_parts=["HEAD", "BRAIN"]),
                models=[CT_HEAD],
                priority=Priority.STAT,
            ),
            CompiledRule(
                policy="example",
                name="chest-xray",
                match=Match(modalities=["CR", "DX"], body_parts=["CHEST"]),
                models=[CHEST_XRAY],
                priority=Priority.URGENT,
                deidentify=True,
            ),
        ],
    )


LOCAL_CLIENT = "local"
FIRST_KEY = "key-1"


def ensure_keyring(config: GatewayConfig) -> Path | None:
    """The example's keyring, made with one random key on first use, readable by its owner
    only (like a mounted Secret); None when the configuration does not encrypt."""
    encryption = config.storage.encryption
    if encryption is None:
        return None
    if not (encryption.key_dir / CURRENT).exists():
        add_key(encryption.key_dir, FIRST_KEY)
    return encryption.key_dir


def ensure_token(config: GatewayConfig) -> Path:
    """The example's one client token, created on first use; its file is readable by its
    owner only, like a mounted Secret."""
    if config.tokens_dir is None:
        raise ValueError("the configuration has no tokensDir")
    config.tokens_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = config.tokens_dir / LOCAL_CLIENT
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_token(config.namespace) + "\n")
    return path
