"""The inference worker: claim the most urgent job for its model from its gateways, keep
the lease while working, fetch the study, run the model, store the SR, complete the job.

A crash at any point loses nothing: until `complete` the job is only leased, and the lease
expires into another worker's hands; the SR's UIDs derive from the job, so a second try
stores the same instance again rather than a second report.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import pydicom
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydicom.dataset import Dataset

from telerad.api.config import WorkerConfig
from telerad.api.jobs import Finding, Job
from telerad.runtime import phi
from telerad.runtime.gpu import Gpus
from telerad.runtime.models import base, volume
from telerad.runtime.models.kserve import InferenceError
from telerad.runtime.results import sr
from telerad.runtime.worker.gateways import Gateway, GatewayError, LeaseLost, session
from telerad.runtime.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)
LONG_POLL_S = 20
"""How long one claim waits at the gateway for a job to be queued."""
# highdicom logs the UIDs of the data sets it copies from at INFO; UIDs stay out of logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)
T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=1800, sock_connect=10, sock_read=300)


class StartupError(Exception):
    """The worker cannot run as configured; the message says what to change."""


def choose_device(config: WorkerConfig, gpus: Gpus) -> base.Device:
    if config.device == "cuda" and not gpus.count:
        raise StartupError(f"device is cuda but no GPU is usable ({gpus.reason or 'none found'})")
    return "cuda" if config.device != "cpu" and gpus.count else "cpu"


def findings(result: base.Result, config: WorkerConfig) -> list[Finding]:
    """The job's findings: each detection, critical at or above its threshold."""
    return [
        Finding(
            label=d.label,
            score=d.score,
            critical=config.thresholds.critical_at(d.label, d.score),
            measurements={m.key: m.value for m in d.measures},
        )
        for d in result.detections
    ]


def read_study(parts: list[bytes], study_uid: str) -> tuple[base.Study, list[Dataset]]:
    datasets = [pydicom.dcmread(io.BytesIO(p)) for p in parts]
    study = volume.assemble(study_uid, datasets)
    evidence = [ds for series in study.series for ds in series.images]
    return study, evidence


def encode(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Worker:
    def __init__(self, config: WorkerConfig, model: base.Model, gpus: Gpus) -> None:
        if model.version != config.model.version:
            raise StartupError(
                f"plugin {config.model.name} is version {model.version},"
                f" the configuration asks for {config.model.version}"
            )
        self.config = config
        self.model = model
        self.queue = config.name or config.model.name
        self.metrics = WorkerMetrics(self.queue, model.device, gpus)
        self.owner = config.owner or f"{socket.gethostname()}/{os.getpid()}"
        self._stopping = asyncio.Event()
        self._alive = time.monotonic()
        """When the loop last came round, or a running job's lease was last extended."""

    # -- the loop ----------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        runner = await self._serve_metrics()
        try:
            async with contextlib.AsyncExitStack() as stack:
                gateways = [
                    Gateway(g, await stack.enter_async_context(session(g, TIMEOUT)))
                    for g in self.config.gateways
                ]
                log.info(
                    "worker %s: model %s %s on %s, %d gateways",
                    self.owner,
                    self.model.name,
                    self.model.version,
                    self.model.device,
                    len(gateways),
                )
                while not self._stopping.is_set():
                    self._alive = time.monotonic()
                    claimed = await self._claim(gateways)
                    if claimed is None:
                        claimed = await self._wait_for_job(gateways)
                    if claimed is None:
                        continue
                    await self._process(*claimed)
        finally:
            await runner.cleanup()

    async def _claim(self, gateways: list[Gateway]) -> tuple[Gateway, Job] | None:
        """From the gateway whose waiting job is most urgent (oldest first among equals)."""
        heads: list[tuple[int, float, Gateway]] = []
        for gateway in gateways:
            try:
                head = await gateway.head(self.queue)
            except GatewayError as exc:
                log.warning("%s", exc)
                continue
            if head is not None:
                heads.append((head.priority.rank, head.created_at.timestamp(), gateway))
        for _, _, gateway in sorted(heads, key=lambda h: h[:2]):
            try:
                job = await gateway.claim(self.queue, self.owner, self.config.lease_seconds)
            except GatewayError as exc:
                log.warning("%s", exc)
                continue
            if job is not None:
                return gateway, job
        return None

    async def _wait_for_job(self, gateways: list[Gateway]) -> tuple[Gateway, Job] | None:
        """Nothing to do: one gateway is asked to answer as soon as a job is queued (a
        long poll); among several, which would get the next job is unknown, so they are
        asked again after the poll interval."""
        waiting: asyncio.Task[Job | None] | None = None
        if len(gateways) == 1:
            waiting = asyncio.create_task(
                gateways[0].claim(
                    self.queue, self.owner, self.config.lease_seconds, wait=LONG_POLL_S
                )
            )
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {t for t in (waiting, stop) if t is not None},
                timeout=None if waiting is not None else self.config.poll_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
        if waiting is None or waiting not in done:
            if waiting is not None:
                # Stopping: a job the gateway leases meanwhile goes back when its lease ends.
                waiting.cancel()
            return None
        try:
            job = waiting.result()
        except GatewayError as exc:
            log.warning("%s", exc)
            await asyncio.sleep(self.config.poll_seconds)
            return None
        return None if job is None else (gateways[0], job)

    async def _process(self, gateway: Gateway, job: Job) -> None:
        ref = phi.ref(job.study_uid)
        log.info("job %s/%d (%s, study %s) claimed", gateway.site, job.id, job.priority, ref)
        work = asyncio.create_task(self._work(gateway, job))
        keeper = asyncio.create_task(self._keep_lease(gateway, job, work))
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await self._fail(gateway, job, "the worker was stopped", retryable=True)
                return
            if work.cancelled():
                self.metrics.job("lost")
                log.warning("job %s/%d: lease lost while working; dropped", gateway.site, job.id)
                return
            error = work.exception()
            if error is None:
                return
            if isinstance(error, LeaseLost):
                self.metrics.job("lost")
                log.warning("job %s/%d: lease lost: %s", gateway.site, job.id, error)
            elif isinstance(error, base.NotApplicable):
                await self._fail(gateway, job, str(error), retryable=False)
            elif isinstance(error, GatewayError | InferenceError):
                await self._fail(gateway, job, str(error), retryable=True)
            else:
                log.error("job %s/%d failed", gateway.site, job.id, exc_info=error)
                await self._fail(gateway, job, f"{type(error).__name__} in the worker", True)
        finally:
            for task in (keeper, stop):
                task.cancel()

    async def _fail(self, gateway: Gateway, job: Job, reason: str, retryable: bool) -> None:
        try:
            failed = await gateway.fail(job, reason, retryable)
        except GatewayError as exc:
            # The lease will expire and the job go back to the queue all the same.
            log.warning("job %s/%d: could not report failure: %s", gateway.site, job.id, exc)
            self.metrics.job("failed")
            return
        self.metrics.job("parked" if failed.state == "parked" else "failed")
        log.warning("job %s/%d %s: %s", gateway.site, job.id, failed.state, reason)

    async def _keep_lease(self, gateway: Gateway, job: Job, work: asyncio.Task[None]) -> None:
        period = self.config.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            try:
                await gateway.extend(job, self.config.lease_seconds)
                self._alive = time.monotonic()
            except LeaseLost:
                work.cancel()
                return
            except GatewayError as exc:
                # Keep trying: the lease has two more periods before it expires.
                log.warning("job %s/%d: lease not extended: %s", gateway.site, job.id, exc)

    async def _timed(self, stage: str, step: Awaitable[T]) -> T:
        started = time.monotonic()
        out = await step
        self.metrics.stage(stage, time.monotonic() - started)
        return out

    async def _thread(self, stage: str, fn: Callable[..., T], *args: object) -> T:
        return await self._timed(stage, asyncio.to_thread(fn, *args))

    async def _work(self, gateway: Gateway, job: Job) -> None:
        if self.config.third_party and not job.deidentify:
            # The gateway de-identifies what third-party models route to; a job that says
            # otherwise comes from a misconfigured gateway, and identified data stays home.
            raise base.NotApplicable("a third-party model takes de-identified studies only")
        parts = await self._timed("fetch", gateway.fetch(job))
        study, evidence = await self._thread("prepare", read_study, parts, job.study_uid)
        if not evidence:
            raise base.NotApplicable("the study has no images this worker can read")
        started = time.monotonic()
        result = await self._thread("inference", self.model.predict, study)
        self.metrics.inference.observe(time.monotonic() - started)
        report = await self._thread(
            "report",
            lambda: encode(
                sr.build(
                    result,
                    evidence,
                    model=self.model.name,
                    version=self.model.version,
                    job_key=f"{gateway.site}/{job.id}/{job.study_uid}",
                    replaces=job.replaces,
                )
            ),
        )
        await self._timed("store", gateway.store(job, report))
        done = await self._timed("complete", gateway.complete(job, findings(result, self.config)))
        self.metrics.job("done")
        log.info(
            "job %s/%d done: %d findings%s",
            gateway.site,
            job.id,
            len(done.findings),
            ", critical" if done.critical else "",
        )

    # -- /metrics and /healthz -----------------------------------------------------
    async def _serve_metrics(self) -> web.AppRunner:
        async def scrape(_: web.Request) -> web.Response:
            body = await asyncio.to_thread(generate_latest, self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            # Alive: the loop comes round between jobs, and the lease is kept during one.
            limit = 3 * max(self.config.lease_seconds, self.config.poll_seconds, 20)
            stale = time.monotonic() - self._alive > limit
            return web.Response(status=503 if stale else 200, text="stale" if stale else "ok")

        app = web.Application()
        app.add_routes([web.get("/metrics", scrape), web.get("/healthz", healthz)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.bind_address, self.config.metrics_port)
        await site.start()
        return runner
