"""The gateway's Prometheus metrics (names from DESIGN.md). Labels carry the site, a
model, a priority, a tier or a fixed reason: never anything from a data set."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from telerad.api.types import Priority
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.tier import Tier

_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 900, 3600)


class GatewayMetrics:
    def __init__(self, site: str) -> None:
        self.site = site
        self.registry = CollectorRegistry(auto_describe=True)
        self.exposed = self.registry
        """What /metrics serves."""
        r = self.registry
        self.instances = Counter(
            "telerad_gateway_instances_received", "Instances stored.", ["site"], registry=r
        ).labels(site)
        self.bytes = Counter(
            "telerad_gateway_bytes_received", "Bytes of stored files.", ["site"], registry=r
        ).labels(site)
        self._associations = Counter(
            "telerad_gateway_associations",
            "Associations by outcome (accepted, released, aborted, rejected).",
            ["site", "result"],
            registry=r,
        )
        self._rejections = Counter(
            "telerad_gateway_rejections",
            "Refused associations, connections and instances by reason.",
            ["site", "reason"],
            registry=r,
        )
        self._duplicates = Counter(
            "telerad_gateway_duplicates",
            "Instances received again: identical (acknowledged, not stored twice) or"
            " different (kept as a new version).",
            ["site", "result"],
            registry=r,
        )
        self._warnings = Counter(
            "telerad_gateway_warnings",
            "Instances stored despite an inconsistency (request and data set disagree).",
            ["site", "reason"],
            registry=r,
        )
        self.reopened = Counter(
            "telerad_gateway_studies_reopened",
            "Instances that arrived after their study was complete.",
            ["site"],
            registry=r,
        ).labels(site)
        self.completed = Counter(
            "telerad_gateway_studies_completed", "Studies completed.", ["site"], registry=r
        ).labels(site)
        self._jobs_created = Counter(
            "telerad_gateway_jobs_created",
            "Jobs queued by routing.",
            ["site", "model", "priority"],
            registry=r,
        )
        self._stage = Histogram(
            "telerad_gateway_stage_seconds",
            "Durations: receive (one C-STORE), complete (first instance to study complete),"
            " queued (job queued to claimed), result (job queued to completed), alert and"
            " export (job completed to delivered).",
            ["site", "stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self._http = Histogram(
            "telerad_gateway_http_request_seconds",
            "HTTP requests by route template, method and status code, with their durations.",
            ["site", "route", "method", "code"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self._deliveries = Counter(
            "telerad_gateway_deliveries",
            "Attempts to send an alert or a result, by outcome (delivered, retry, parked).",
            ["site", "kind", "result"],
            registry=r,
        )
        self._lifecycle = Counter(
            "telerad_gateway_lifecycle_studies",
            "Studies moved to the warm tier or deleted after retention.",
            ["site", "action"],
            registry=r,
        )

    def http_request(self, route: str, method: str, code: int, seconds: float) -> None:
        self._http.labels(self.site, route, method, str(code)).observe(seconds)

    def association(self, result: str) -> None:
        self._associations.labels(self.site, result).inc()

    def rejection(self, reason: str) -> None:
        self._rejections.labels(self.site, reason).inc()

    def warning(self, reason: str) -> None:
        self._warnings.labels(self.site, reason).inc()

    def duplicate(self, result: str) -> None:
        self._duplicates.labels(self.site, result).inc()

    def job_created(self, model: str, priority: Priority) -> None:
        self._jobs_created.labels(self.site, model, str(priority)).inc()

    def stage(self, stage: str, seconds: float) -> None:
        self._stage.labels(self.site, stage).observe(max(seconds, 0.0))

    def delivery(self, kind: str, result: str) -> None:
        self._deliveries.labels(self.site, kind, result).inc()

    def lifecycle(self, action: str) -> None:
        self._lifecycle.labels(self.site, action).inc()

    def watch(
        self,
        catalog: Catalog,
        tiers: list[Tier],
        models: list[str],
        clock: Callable[[], float] = time.time,
        *,
        certificate_expires: float | None = None,
    ) -> None:
        """Queue depth, job states and free space, read at scrape time (never stale), and
        the expiry (Unix time) of the site certificate the gateway serves, when it has one.
        Every routed model reports every priority, zeros included: the autoscaler reads a
        missing series as "unknown", never as an empty queue.

        With several receiver processes (PROMETHEUS_MULTIPROC_DIR set before
        prometheus_client was imported), counters live in files every process writes;
        /metrics then serves their sum instead of this process's own registry."""
        state = _StateCollector(
            self.site, catalog, tiers, models, clock, certificate_expires=certificate_expires
        )
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:
            self.exposed = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposed, path=shared)  # type: ignore[no-untyped-call]
        self.exposed.register(state)


class _StateCollector(Collector):
    def __init__(
        self,
        site: str,
        catalog: Catalog,
        tiers: list[Tier],
        models: list[str],
        clock: Callable[[], float],
        *,
        certificate_expires: float | None,
    ) -> None:
        self._site, self._catalog, self._tiers, self._clock = site, catalog, tiers, clock
        self._certificate_expires = certificate_expires
        self._zeros = {(m, p): 0 for m in models for p in Priority}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "telerad_gateway_catalog_up",
            "1 when the catalog's database answers, 0 when it does not (stores and job"
            " claims fail meanwhile); the operator's CatalogUnavailable condition reads it.",
            labels=["site"],
        )
        try:
            # Read whole before anything is yielded, so an outage mid-read leaves out
            # every catalog series rather than a part that reads as an empty queue.
            from_catalog, answered = list(self._from_catalog(self._clock())), True
        except Exception:  # whatever the backend raises when its database is gone
            from_catalog, answered = [], False
        up.add_metric([self._site], 1 if answered else 0)
        yield up
        yield from from_catalog
        free = GaugeMetricFamily(
            "telerad_gateway_free_bytes", "Free space of each tier.", labels=["site", "tier"]
        )
        for tier in self._tiers:
            free.add_metric([self._site, tier.name], tier.free_bytes())
        yield free
        if self._certificate_expires is not None:
            expiry = GaugeMetricFamily(
                "telerad_gateway_certificate_expiry_timestamp_seconds",
                "When the site certificate the gateway serves (DICOM TLS, HTTPS) expires.",
                labels=["site"],
            )
            expiry.add_metric([self._site], self._certificate_expires)
            yield expiry

    def _from_catalog(self, now: float) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "telerad_queue_depth",
            "Jobs waiting to be claimed.",
            labels=["site", "model", "priority"],
        )
        waiting = self._zeros | self._catalog.queue_depth(now)
        for (model, priority), n in sorted(waiting.items()):
            depth.add_metric([self._site, model, str(priority)], n)
        yield depth
        oldest = GaugeMetricFamily(
            "telerad_queue_oldest_seconds",
            "Age of the oldest job waiting to be claimed (0: none waits); the queue's SLO signal.",
            labels=["site", "model", "priority"],
        )
        queued_at = self._catalog.queue_oldest(now)
        for model, priority in sorted(self._zeros | dict.fromkeys(queued_at, 0)):
            age = now - queued_at[(model, priority)] if (model, priority) in queued_at else 0.0
            oldest.add_metric([self._site, model, str(priority)], max(age, 0.0))
        yield oldest
        states = GaugeMetricFamily(
            "telerad_gateway_jobs", "Jobs by state.", labels=["site", "model", "state"]
        )
        for (model, state), n in sorted(self._catalog.job_states().items()):
            states.add_metric([self._site, model, state], n)
        yield states
        outbox = GaugeMetricFamily(
            "telerad_gateway_outbox",
            "Alerts and result exports by state (pending, delivered, parked).",
            labels=["site", "kind", "state"],
        )
        for (kind, state), n in sorted(self._catalog.delivery_states().items()):
            outbox.add_metric([self._site, kind, state], n)
        yield outbox
