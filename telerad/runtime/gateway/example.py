"""A complete configuration for a local gateway, so a newcomer starts one with two
commands. Its routing matches the worker's reference models (CT head, chest X-ray), so the
two example configs together make a working pipeline."""

from __future__ import annotations

from pathlib import Path

from telerad.api.aimodel import IntendedUse, Thresholds
from telerad.api.config import CompiledRule, GatewayConfig, ModelRoute, StoragePaths
from telerad.api.routing import Match
from telerad.api.site import AllowedCaller, Completion
from telerad.api.types import Priority

CT_HEAD = ModelRoute(
    name="ct-head-hyperdensity",
    intended_use=IntendedUse(modalities=["CT"], body_parts=["HEAD", "BRAIN"]),
    thresholds=Thresholds(critical=0.8),
)
CHEST_XRAY = ModelRoute(
    name="chest-xray-triage",
    third_party=True,
    intended_use=IntendedUse(modalities=["CR", "DX"], body_parts=["CHEST"]),
)
LOCAL = ["127.0.0.0/8", "::1/128"]
# The calling AE titles that dcmtk's and pynetdicom's tools use unless told otherwise.
LOCAL_SENDERS = ("STORESCU", "ECHOSCU", "FINDSCU", "PYNETDICOM", "TELERAD")


def example_config(port: int, http_port: int, data_dir: Path) -> GatewayConfig:
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
        storage=StoragePaths(
            hot_dir=data_dir / "hot",
            warm_dir=data_dir / "warm",
            hot_days=7,
            retention_days=30,
            min_free_bytes=256 << 20,
        ),
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
