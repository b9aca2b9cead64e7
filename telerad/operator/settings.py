"""Operator settings, from ``telerad operator`` flags or TELERAD_* environment variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from telerad import __version__


class OperatorSettings(BaseSettings):
    """Everything the operator is told from outside; the builders read it as plain data."""

    model_config = SettingsConfigDict(env_prefix="TELERAD_", frozen=True)

    image: str = f"ghcr.io/telerad/telerad:{__version__}"
    """Image of the gateways (the same image runs `telerad gateway`)."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of the gateway and worker containers."""
    namespaces: Annotated[list[str], Field(default_factory=list)]
    """Namespaces to serve; empty serves the whole cluster."""
    resync_seconds: float = Field(default=60.0, gt=0)
    """Interval of the periodic full reconcile of every object."""
    operator_namespace: str = "telerad-system"
    """Namespace the operator runs in (its autoscaler may scrape the gateways' HTTP port)."""
    monitoring_namespace: str = "monitoring"
    """Namespace whose pods (Prometheus) may scrape the gateways' HTTP port."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Port of the operator's /metrics (0 disables)."""
    liveness_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the operator's /healthz liveness endpoint (0 disables)."""
    autoscale_interval_seconds: float = Field(default=10.0, ge=0)
    """Interval of each AIModel's autoscaling loop (0 turns the autoscaler off)."""
    prometheus_url: str | None = None
    """Read the autoscaler's metrics from this Prometheus (PromQL over HTTP) instead of
    scraping the gateway and worker pods directly."""
    dcgm_urls: Annotated[list[str], Field(default_factory=list)]
    """Direct source only: NVIDIA DCGM exporters to scrape for the workers' GPU
    utilisation (`DCGM_FI_DEV_GPU_UTIL` with pod labels), besides the workers' own gauges."""
    scrape_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    """Time allowed for each metrics read of the autoscaler."""
