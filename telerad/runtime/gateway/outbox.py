"""What a completed job causes beyond the catalog: critical-finding webhooks and results
forwarded to the site's destinations.

Both are planned when the job completes and written to the outbox in the same transaction
as the completion, so a crash can delay them but never lose them. The sender retries each
with exponential backoff; every attempt carries the same idempotency key (the
`Idempotency-Key` header of a webhook), so a receiver that sees a message twice, because
the gateway died between its answer and the bookkeeping, can tell. Every attempt is
written to the audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp

from telerad.api.config import GatewayConfig, backoff
from telerad.api.jobs import Job
from telerad.api.site import Webhook
from telerad.api.types import Priority
from telerad.runtime import phi
from telerad.runtime.gateway import exports
from telerad.runtime.gateway.exports import Exporter, ExportError, read_secret
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.store.catalog import Catalog, Delivery, DeliveryKind, NewDelivery

log = logging.getLogger(__name__)
ALERT_TIMEOUT_S = 30
TIMEOUT = aiohttp.ClientTimeout(total=ALERT_TIMEOUT_S, sock_connect=5)
BATCH = 32
SIGNATURE_HEADER = "Telerad-Signature"


def plan(config: GatewayConfig, job: Job, base_url: str) -> list[NewDelivery]:
    """Deliveries a completed job causes: an alert to each webhook whose lowest priority
    the job's priority (its rule's, not the stat its critical finding gives the study)
    reaches, when a finding is critical and its rule notifies; its result to every
    destination."""
    out = []
    if job.critical and job.notify:
        body = alert(config, job, base_url)
        out += [
            NewDelivery(DeliveryKind.ALERT, hook.name, body)
            for hook in config.notifications.webhooks
            if job.priority.reaches(hook.min_priority)
        ]
    out += [NewDelivery(DeliveryKind.EXPORT, d.name, "{}") for d in config.destinations]
    return out


def alert(config: GatewayConfig, job: Job, base_url: str) -> str:
    """The webhook body: where to look and what was found; UIDs, never names or IDs.
    `study` is the study's WADO-RS URL (its QIDO-RS series list is `{study}/series`),
    `worklist` the worklist's, both under `base_url`; a receiver fetches them with its
    own token of the site's tenant."""
    base = base_url.rstrip("/")
    return json.dumps(
        {
            "kind": "critical-finding",
            "namespace": config.namespace,
            "site": config.site,
            "job": job.id,
            "model": job.model,
            "priority": Priority.STAT,
            "studyInstanceUID": job.study_uid,
            "study": f"{base}/studies/{job.study_uid}",
            "worklist": f"{base}/worklist",
            "findings": [f.model_dump(mode="json", by_alias=True) for f in job.findings],
        },
        separators=(",", ":"),
    )


def sign(key: str, timestamp: str, body: bytes) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`: the time is signed too, so a
    captured request cannot be replayed later as new."""
    mac = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Outbox:
    def __init__(
        self,
        config: GatewayConfig,
        catalog: Catalog,
        exporter: Exporter,
        metrics: GatewayMetrics,
        record: Callable[[dict[str, object]], None],
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.exporter = exporter
        self.metrics = metrics
        self.record = record
        self._hooks = {h.name: h for h in config.notifications.webhooks}
        self._session: aiohttp.ClientSession | None = None
        self.owner = f"{socket.gethostname()}:{config.http_port}"
        """This sender, on its leases: the same after a restart in place."""
        # Longer than one attempt of each kind can take, with a margin.
        self._leases = {
            DeliveryKind.ALERT: ALERT_TIMEOUT_S * 2,
            DeliveryKind.EXPORT: exports.EXPORT_TIMEOUT_S + 60,
        }

    async def resume(self) -> None:
        """Take back at once what this sender held when it stopped."""
        released = await asyncio.to_thread(self.catalog.release_deliveries, self.owner, time.time())
        if released:
            log.info("%d deliveries interrupted by a stop are due again", released)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send_due(self) -> int:
        """One pass: send every due delivery (a batch at a time, concurrently)."""
        due = await asyncio.to_thread(
            self.catalog.claim_deliveries, self.owner, time.time(), BATCH, self._leases
        )
        if due:
            await asyncio.gather(*(self._attempt(d) for d in due))
        return len(due)

    async def _attempt(self, delivery: Delivery) -> None:
        send: Callable[[Delivery], Awaitable[str]] = (
            self._alert if delivery.kind == DeliveryKind.ALERT else self._export
        )
        started = time.monotonic()
        try:
            outcome = await send(delivery)
        except (ExportError, aiohttp.ClientError, TimeoutError, _Refused) as exc:
            await self._failed(delivery, str(exc) or type(exc).__name__)
            return
        now = time.time()
        await asyncio.to_thread(self.catalog.delivered, delivery.id, now)
        self.metrics.delivery(delivery.kind, "delivered")
        self.metrics.stage(str(delivery.kind), now - delivery.created_at)
        await self._audit(delivery, "delivered", outcome, time.monotonic() - started)

    async def _failed(self, delivery: Delivery, error: str) -> None:
        policy = self.config.delivery
        attempts = delivery.attempts + 1
        retry_at = None
        if attempts < policy.max_attempts:
            delay = backoff(policy, attempts)
            retry_at = time.time() + delay
        await asyncio.to_thread(
            self.catalog.delivery_failed, delivery.id, error[:500], retry_at, time.time()
        )
        result = "retry" if retry_at is not None else "parked"
        self.metrics.delivery(delivery.kind, result)
        await self._audit(delivery, result, error[:200], None)
        log.warning(
            "%s %s of job %d, attempt %d: %s (%s)",
            delivery.kind,
            delivery.target,
            delivery.job_id,
            attempts,
            error[:200],
            result,
        )

    async def _audit(
        self, delivery: Delivery, result: str, detail: str, seconds: float | None
    ) -> None:
        # On a thread: the trail may be a database.
        await asyncio.to_thread(
            self.record,
            {
                "event": "delivery",
                "kind": str(delivery.kind),
                "target": delivery.target,
                "key": delivery.key,
                "job": delivery.job_id,
                "study": phi.ref(delivery.study_uid),
                "attempt": delivery.attempts + 1,
                "result": result,
                "detail": detail,
                "ms": None if seconds is None else round(seconds * 1000, 1),
            },
        )

    async def _alert(self, delivery: Delivery) -> str:
        hook: Webhook | None = self._hooks.get(delivery.target)
        if hook is None:
            raise _Refused(f"webhook {delivery.target!r} is no longer configured")
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.key,
            "User-Agent": "telerad-gateway",
        }
        if hook.signing_secret is not None:
            key = read_secret(self.config, hook.signing_secret, f"webhook {hook.name!r}")
            timestamp = str(int(datetime.now(UTC).timestamp()))
            headers[SIGNATURE_HEADER] = sign(key, timestamp, body)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        async with self._session.post(str(hook.url), data=body, headers=headers) as answer:
            if not 200 <= answer.status < 300:
                raise _Refused(f"webhook {hook.name!r} answered {answer.status}")
            return f"HTTP {answer.status}"

    async def _export(self, delivery: Delivery) -> str:
        destination = self.exporter.destination(delivery.target)
        located = await asyncio.to_thread(self.catalog.results, delivery.job_id)
        if not located:
            return "no result instances"
        files = self.exporter.files(located)
        report = await self.exporter.send(destination, files)
        if report.failed:
            raise _Refused(f"destination {destination.name!r} refused {report.failed} instances")
        return f"{report.stored} stored"


class _Refused(Exception):
    """The target answered, but not with acceptance."""
