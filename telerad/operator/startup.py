"""Every kopf setting, in one place, applied when the operator starts."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from prometheus_client import start_http_server

from telerad.api.names import GROUP
from telerad.operator.autoscale.scaler import Autoscaler
from telerad.operator.autoscale.sources import Direct, Prometheus, Source
from telerad.operator.k8s import Kube
from telerad.operator.reconcile import Reconciler
from telerad.operator.settings import OperatorSettings


def configure(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    # Our own bookkeeping keys, not kopf.zalando.org's, and never in status: status is
    # ours, written whole by the reconcilers.
    kopf_settings.persistence.finalizer = f"{GROUP}/finalizer"
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Explicit watch timeouts: a watch that goes quiet is reconnected, never trusted.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.networking.request_timeout = 30
    kopf_settings.networking.connect_timeout = 10
    # Events are posted by the reconcilers with reasons from events.py; kopf adds only
    # its own warnings (handler failures).
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.batching.worker_limit = 64
    # One line per HTTP request drowns everything else.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    kopf_settings.execution.max_workers = 8
    logging.getLogger("kopf.objects").addFilter(_quiet_timers)


def _quiet_timers(record: logging.LogRecord) -> bool:
    # A line per object per autoscaler tick says nothing; failures are still logged.
    message = record.getMessage()
    return not (message.startswith("Timer '") and message.endswith("' succeeded."))


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Startup and cleanup: kopf settings, the metrics server, the API client and the
    reconciler, shared with every handler through kopf's memo."""

    @kopf.on.startup(registry=registry)
    async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings, operator_settings)
        if operator_settings.metrics_port:
            start_http_server(operator_settings.metrics_port)
        kube = Kube.connect()
        memo["kube"] = kube
        memo["reconciler"] = Reconciler(kube, operator_settings, _autoscaler(kube))

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own gets none of kopf's default logins: KUBECONFIG (or
        # ~/.kube/config) first, then the pod's service account.
        return kopf.login_with_kubeconfig(**kwargs) or kopf.login_with_service_account(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo["reconciler"].close()
        await memo["kube"].close()

    def _autoscaler(kube: Kube) -> Autoscaler | None:
        s = operator_settings
        if not s.autoscale_interval_seconds:
            return None
        source: Source = (
            Prometheus(s.prometheus_url, s.scrape_timeout_seconds)
            if s.prometheus_url
            else Direct(s.scrape_timeout_seconds, s.dcgm_urls)
        )
        return Autoscaler(kube, source)

    operator_settings = settings
