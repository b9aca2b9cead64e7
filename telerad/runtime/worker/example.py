"""A complete configuration for a local worker beside the example gateway."""

from __future__ import annotations

from pathlib import Path

from telerad.api.aimodel import ModelRef, Thresholds
from telerad.api.config import GatewayEndpoint, WorkerConfig
from telerad.runtime.models import base


def example_config(
    gateway_url: str, model: str, token_file: Path, metrics_port: int
) -> WorkerConfig:
    plugin = base.load(model, "cpu")
    return WorkerConfig(
        model=ModelRef(name=model, version=plugin.version),
        gateways=[
            GatewayEndpoint(site="example", url=gateway_url, token_file=token_file.absolute())
        ],
        thresholds=Thresholds(critical=0.8),
        device="auto",
        lease_seconds=30,
        metrics_port=metrics_port,
        bind_address="127.0.0.1",
    )
