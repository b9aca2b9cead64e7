"""One site's gateway process: wires storage, catalog, the DICOM receiver and the HTTP
port together, runs the completion and lifecycle loops, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
import time
from typing import Any

from aiohttp import web

from telerad.api import certificates
from telerad.api.config import GatewayConfig
from telerad.runtime.gateway.access import Tokens
from telerad.runtime.gateway.deid import Deidentifier
from telerad.runtime.gateway.dicomweb import DicomWeb
from telerad.runtime.gateway.dimse import DimseServer, tls_context
from telerad.runtime.gateway.exports import Exporter
from telerad.runtime.gateway.flow import Flow
from telerad.runtime.gateway.http import build_app
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.gateway.outbox import Outbox
from telerad.runtime.gateway.receivers import Pool, Receiver, default_count
from telerad.runtime.gateway.waiters import Waiters
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import Catalog

log = logging.getLogger(__name__)
COMPLETION_TICK_S = 1.0
# The key behind the pseudonyms of de-identified copies, beside the catalog.
DEID_KEY_FILE = "deid.key"
# Pending alerts wait at most this long for their first attempt.
OUTBOX_TICK_S = 0.2


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        storage = config.storage
        count = config.receivers or default_count()
        self.pool = Pool(config, count - 1)
        self.receiver = Receiver.build(config, GatewayMetrics(config.site), self.pool.slots(0))
        self.hot, self.catalog, self.metrics = (
            self.receiver.hot,
            self.receiver.catalog,
            self.receiver.metrics,
        )
        self.dimse = self.receiver.dimse
        # A crash mid-store leaves temporaries in the hot tier, and files renamed but not
        # catalogued; one mid-move, in the tier it moved to (or from). No receiver runs
        # yet: nothing is mid-store.
        # With a shared catalog, only what is older than the grace period: a newer file may
        # be another gateway's store in flight.
        tiers = list(self.receiver.tiers.values())
        before = time.time() - config.sweep_grace_seconds
        swept = sum(t.sweep_temporaries(before) for t in tiers)
        if swept:
            log.info("removed %d unacknowledged partial files left by a crash", swept)
        swept = sum(t.sweep_uncatalogued(self.catalog.catalogued_paths, before) for t in tiers)
        if swept:
            log.warning("removed %d uncatalogued (unacknowledged) files left by a crash", swept)
        self.deid = Deidentifier(
            config.deidentification_key_file or storage.hot_dir / DEID_KEY_FILE
        )
        self.flow = Flow(config, self.catalog, self.receiver.tiers, self.metrics, deid=self.deid)
        expires = _certificate_expiry(config)
        self.metrics.watch(
            self.catalog,
            tiers,
            self.flow.models,
            certificate_expires=expires.timestamp() if expires is not None else None,
        )
        self.tokens = Tokens(config.namespace, config.tokens_dir)
        self.audit = backends.open_audit(config, self.catalog)
        self._runner: web.AppRunner | None = None
        self.waiters: Waiters | None = None
        self.outbox: Outbox | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False
        """Stopping: no new associations, running ones finishing (SIGTERM received)."""

    def readiness(self) -> dict[str, Any]:
        """Whether the gateway accepts associations: /readyz, the pod's readiness probe,
        so a draining or half-started gateway is taken out of its Service."""
        listening = self.dimse.listening and self.pool.alive()
        return {
            "ready": listening and not self.draining,
            "listening": listening,
            "draining": self.draining,
        }

    def liveness(self) -> dict[str, Any]:
        """Whether restarting the process could help: /livez, the pod's liveness probe.
        Only the process's own parts count: a catalog or a disk that is down or full is
        the same after a restart, and restarting every gateway of a site at once for a
        database outage would drop the associations that are still being answered."""
        listening = self.dimse.listening and self.pool.alive()
        return {"live": listening or self.draining, "listening": listening}

    def health(self) -> dict[str, Any]:
        free = self.hot.free_bytes()
        checks = {
            "catalog": _catalog_ok(self.catalog),
            "dicom": self.dimse.listening and self.pool.alive(),
            "space": free >= self.config.storage.min_free_bytes,
        }
        return {
            "ok": all(checks.values()),
            "checks": checks,
            "associations": self.dimse.active_associations(),
            "freeBytes": free,
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # How long to go on accepting once asked to stop. SIGTERM: the pod stopping, with a
        # Service to leave first. Ctrl-C: someone at a terminal, with none.
        stopping: asyncio.Future[float] = loop.create_future()

        def stop_after(linger: float) -> None:
            if not stopping.done():
                stopping.set_result(linger)

        for sig, seconds in ((signal.SIGTERM, self.config.unready_seconds), (signal.SIGINT, 0.0)):
            loop.add_signal_handler(sig, stop_after, seconds)
        await self.start()
        log.info(
            "gateway %s/%s: DICOM %s on %s:%d, HTTP on :%d%s",
            self.config.namespace,
            self.config.site,
            self.config.ae_title,
            self.config.bind_address,
            self.config.dicom_port,
            self.config.http_port,
            " (TLS)" if self.config.tls else "",
        )
        linger = await stopping
        self.draining = True
        log.info(
            "stopping: not ready, still accepting for %ss, then %ss for running associations",
            linger,
            self.config.drain_seconds,
        )
        await asyncio.sleep(linger)
        await self.stop()

    async def start(self) -> None:
        listener = DimseServer.listen(self.config)
        # Children first: /healthz answers once every receiver takes connections.
        await asyncio.to_thread(self.pool.start, listener)
        self.dimse.start(listener)
        tiers = self.receiver.tiers
        exporter = Exporter(self.config, self.catalog, tiers, self.config.ae_title)
        self.waiters = Waiters(asyncio.get_running_loop())
        self.catalog.subscribe(self.waiters.wake)
        self.outbox = Outbox(self.config, self.catalog, exporter, self.metrics, self.audit.write)
        app = build_app(
            flow=self.flow,
            metrics=self.metrics,
            health=self.health,
            readiness=self.readiness,
            liveness=self.liveness,
            tokens=self.tokens,
            audit=self.audit,
            dicomweb=DicomWeb(
                self.catalog,
                tiers,
                self.receiver.ingest,
                self.deid,
            ),
            exporter=exporter,
            limits=self.config.http,
            waiters=self.waiters,
            public_url=self.config.public_url,
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        tls = self.config.tls
        site = web.TCPSite(
            self._runner,
            self.config.bind_address,
            self.config.http_port,
            ssl_context=tls_context(tls, http=True) if tls is not None else None,
        )
        await site.start()
        await asyncio.to_thread(self.flow.resume, time.time())
        await self.outbox.resume()
        storage = self.config.storage
        self._tasks = [
            asyncio.create_task(self._every(COMPLETION_TICK_S, self.flow.complete_due)),
            asyncio.create_task(self._every(storage.lifecycle_interval_seconds, self._lifecycle)),
            asyncio.create_task(self._every(COMPLETION_TICK_S, self._tick)),
            asyncio.create_task(self._deliver()),
        ]

    async def _deliver(self) -> None:
        assert self.outbox is not None  # noqa: S101  (set by start)
        while True:
            try:
                sent = await self.outbox.send_due()
            except Exception:
                log.exception("outbox pass failed")
                sent = 0
            if not sent:
                await asyncio.sleep(OUTBOX_TICK_S)

    def _lifecycle(self, now: float) -> None:
        self.flow.lifecycle(now)
        self.audit.prune(now, self.config.storage.retention_days)

    def _tick(self, now: float) -> None:
        self.pool.keep_alive()
        self.audit.sync()

    async def stop(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.dimse.stop, self.config.drain_seconds),
            asyncio.to_thread(self.pool.stop, self.config.drain_seconds),
        )
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.waiters is not None:
            self.waiters.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.outbox is not None:
            await self.outbox.close()
        self.audit.close()
        self.catalog.close()

    @staticmethod
    async def _every(interval: float, step: Any) -> None:
        while True:
            try:
                await asyncio.to_thread(step, time.time())
            except Exception:
                # A failed pass is retried on the next tick; the loop itself must survive.
                log.exception("%s failed", getattr(step, "__name__", step))
            await asyncio.sleep(interval)


def _certificate_expiry(config: GatewayConfig) -> datetime.datetime | None:
    """The expiry of the certificate this process serves (read once: the TLS contexts
    are made at start, so a renewed Secret takes effect on restart), with a warning when
    it is expired or close to it."""
    if config.tls is None:
        return None
    expires = certificates.not_after(config.tls.cert_file.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    if certificates.assess(expires, now) is not certificates.Expiry.VALID:
        log.warning(
            "site certificate %s: %s; renew the site's TLS Secret, then restart the gateway",
            config.tls.cert_file,
            certificates.describe(expires, now),
        )
    return expires


def _catalog_ok(catalog: Catalog) -> bool:
    try:
        catalog.queue_depth(time.time())
    except Exception:
        return False
    return True
