"""Where the autoscaler's readings come from: straight from the pods' /metrics (the
default), or from Prometheus. Both answer the same question the same way, from samples
labelled with the pod they come from, so the decision does not depend on the source.

A reading that fails in part is unknown as a whole: a gateway that did not answer may
hold the very jobs that should keep workers up.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from telerad.api.types import Priority
from telerad.operator.autoscale import signals
from telerad.operator.autoscale.signals import Sample
from telerad.operator.metrics import METRIC_READ_SECONDS


@dataclass(frozen=True, slots=True)
class Target:
    """One pod's metrics endpoint."""

    pod: str
    url: str
    ca: bytes | None = None
    """PEM of the CA that signs its HTTPS certificate."""
    server_name: str | None = None
    """Name its certificate is checked against (the Service's DNS name, not the pod IP)."""


@dataclass(frozen=True, slots=True)
class Targets:
    namespace: str
    model: str
    gateways: Sequence[Target]
    """The ready gateway pods of every site whose rules send jobs to the model."""
    workers: Sequence[Target]
    """The model's ready worker pods."""


@dataclass(frozen=True, slots=True)
class Reading:
    queue: dict[Priority, int] | None
    gpu_utilization: list[float] | None
    problems: list[str] = field(default_factory=list)
    running: int = 0
    """Jobs leased to workers (0 when the queue is unknown)."""
    """Why a part is unknown: names and addresses, never study data."""


class Source(Protocol):
    name: str

    async def read(self, targets: Targets) -> Reading: ...

    async def close(self) -> None: ...


class ReadError(Exception):
    pass


def _reading(
    targets: Targets, samples: list[Sample], queue_problems: list[str], gpu_problems: list[str]
) -> Reading:
    queue, running = None, 0
    if not queue_problems:
        running = signals.running(samples, targets.model)
        queue = signals.queue_depth(samples, targets.model, {t.pod for t in targets.gateways})
        if queue is None:
            queue_problems.append("a gateway does not report the model's queue")
    gpu = None
    if not gpu_problems:
        gpu = signals.gpu_utilization(samples, {t.pod for t in targets.workers})
    problems = queue_problems + gpu_problems
    return Reading(queue=queue, gpu_utilization=gpu, problems=problems, running=running)


class Direct:
    """Scrapes each pod's /metrics (and DCGM exporters, when given)."""

    name = "direct"

    def __init__(self, timeout: float, dcgm_urls: Sequence[str] = ()) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._dcgm = list(dcgm_urls)
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[bytes, ssl.SSLContext] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _context(self, ca: bytes) -> ssl.SSLContext:
        if ca not in self._contexts:
            self._contexts[ca] = ssl.create_default_context(cadata=ca.decode())
        return self._contexts[ca]

    async def scrape(self, url: str, target: Target | None = None) -> list[Sample]:
        options: dict[str, object] = {}
        if target is not None and target.ca is not None:
            options = {"ssl": self._context(target.ca), "server_hostname": target.server_name}
        try:
            async with self._client().get(url, **options) as resp:  # type: ignore[arg-type]
                if resp.status != 200:
                    raise ReadError(f"{url} answered {resp.status}")
                text = await resp.text()
        except aiohttp.ClientConnectorError as err:
            # Its own text names the SSL context by memory address: a status message that
            # changed at every operator start would rewrite the AIModel's status each time.
            raise ReadError(f"{url}: cannot connect: {err.os_error}") from err
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as err:
            raise ReadError(f"{url}: {err or type(err).__name__}") from err
        try:
            return signals.parse(text, target.pod if target is not None else None)
        except ValueError as err:
            raise ReadError(f"{url} is not Prometheus text: {err}") from err

    async def read(self, targets: Targets) -> Reading:
        started = time.monotonic()
        jobs = [
            *(("gateway", t.url, t) for t in targets.gateways),
            *(("worker", t.url, t) for t in targets.workers),
            *(("dcgm", url, None) for url in (self._dcgm if targets.workers else [])),
        ]
        results = await asyncio.gather(
            *(self.scrape(url, target) for _, url, target in jobs), return_exceptions=True
        )
        samples: list[Sample] = []
        queue_problems: list[str] = []
        gpu_problems: list[str] = []
        for (role, _, target), result in zip(jobs, results, strict=True):
            if isinstance(result, ReadError):
                who = f" {target.pod}" if target is not None else ""
                problems = queue_problems if role == "gateway" else gpu_problems
                problems.append(f"{role}{who}: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                samples += result
        METRIC_READ_SECONDS.labels(self.name).observe(time.monotonic() - started)
        return _reading(targets, samples, queue_problems, gpu_problems)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _pods(targets: Sequence[Target]) -> str:
    return "|".join(re.escape(t.pod) for t in targets)


class Prometheus:
    """PromQL instant queries against a Prometheus that scrapes the gateways and workers
    with `namespace` and `pod` labels (what a PodMonitor gives every series)."""

    name = "prometheus"

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _query(self, query: str) -> list[Sample]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(self._url, data={"query": query}) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise ReadError(f"Prometheus at {self._url}: {err or type(err).__name__}") from err
        if body.get("status") != "success":
            raise ReadError(f"Prometheus refused a query: {body.get('error', body)}")
        return [
            Sample(r["metric"].get("__name__", ""), r["metric"], float(r["value"][1]))
            for r in body["data"]["result"]
        ]

    async def read(self, targets: Targets) -> Reading:
        started = time.monotonic()
        ns, model = _quote(targets.namespace), _quote(targets.model)
        queries = [
            f'{signals.QUEUE}{{namespace="{ns}",model="{model}"}}',
            f'{signals.JOBS}{{namespace="{ns}",model="{model}",state="leased"}}',
        ]
        if targets.workers:
            pods = _quote(_pods(targets.workers))
            queries.append(f'{signals.NVML}{{namespace="{ns}",pod=~"{pods}"}}')
            queries.append(
                f'{signals.DCGM}{{namespace="{ns}",pod=~"{pods}"}} or '
                f'{signals.DCGM}{{exported_namespace="{ns}",exported_pod=~"{pods}"}}'
            )
        try:
            answers = await asyncio.gather(*(self._query(q) for q in queries))
        except ReadError as err:
            return Reading(queue=None, gpu_utilization=None, problems=[str(err)])
        finally:
            METRIC_READ_SECONDS.labels(self.name).observe(time.monotonic() - started)
        return _reading(targets, [s for answer in answers for s in answer], [], [])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
