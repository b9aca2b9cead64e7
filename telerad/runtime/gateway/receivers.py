"""The DICOM port served by several processes, so that ingest uses every core.

One Python process runs one core at a time (the GIL); the data path is mostly Python, so
a gateway with N cores runs N receivers: its own process and N - 1 children, all
accepting on one listening socket (whichever is free takes the next connection), each
with its own catalog connection (SQLite serialises writers across processes). Children die with
the gateway (PR_SET_PDEATHSIG), so a killed gateway never leaves a receiver behind on its
port, and a child that dies alone is started again.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from telerad import logs
from telerad.api.config import HOT, GatewayConfig
from telerad.runtime.gateway.dimse import DimseServer, Slots
from telerad.runtime.gateway.ingest import Ingest
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.tier import Tier
from telerad.runtime.store.tiers import open_tiers

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 60.0


def default_count(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU limit (a pod
    limited to 2 CPUs on a 64-core node gets 2 receivers, not 64)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, count)
    if quota != "max":
        count = min(count, math.ceil(int(quota) / int(period)))
    return max(1, count)


@dataclass
class Receiver:
    """What one process needs to take instances: the hot tier, a catalog connection and
    the DICOM server with its ingest path."""

    hot: Tier
    tiers: dict[str, Tier]
    catalog: Catalog
    metrics: GatewayMetrics
    ingest: Ingest
    dimse: DimseServer

    @classmethod
    def build(cls, config: GatewayConfig, metrics: GatewayMetrics, slots: Slots) -> Receiver:
        """One of the gateway's receivers, holding its associations to the shared `slots`."""
        tiers = open_tiers(config.storage)
        hot = tiers[HOT]
        catalog = backends.open_site(config)
        ingest = Ingest(
            catalog, tiers, metrics, config.storage.min_free_bytes, rules=config.routing
        )
        dimse = DimseServer(
            config,
            ingest,
            metrics,
            slots=slots,
            # Each receiver its own: a descriptor on the day's file, or its catalog's pool.
            audit=backends.open_audit(config, catalog),
        )
        return cls(hot, tiers, catalog, metrics, ingest, dimse)


@dataclass(frozen=True)
class _Spec:
    """What a child receiver is told (pickled to it)."""

    config: dict[str, Any]
    log_level: int
    parent: int


def _child(spec: _Spec, listener: socket.socket, slots: Slots, ready: Event) -> None:
    """A receiver process: serve until the gateway stops it (SIGTERM) or dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != spec.parent:
        return  # the gateway died while this process was starting: nothing to serve
    logs.setup(spec.log_level, "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    config = GatewayConfig.model_validate(spec.config)
    receiver = Receiver.build(config, GatewayMetrics(config.site), slots)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    receiver.dimse.start(listener)
    ready.set()
    stop.wait()
    receiver.dimse.stop(config.drain_seconds)
    receiver.catalog.close()


class Pool:
    """The child receivers of a gateway, and the association slots all its receivers share
    (index 0 is the gateway's own)."""

    def __init__(self, config: GatewayConfig, children: int) -> None:
        self._spec = _Spec(
            config=config.model_dump(mode="json"),
            log_level=logging.getLogger().getEffectiveLevel(),
            parent=os.getpid(),
        )
        self._context = multiprocessing.get_context("spawn")
        self._counts = self._context.Array("i", children + 1)
        self._limit = config.dimse.max_associations
        self._children: list[BaseProcess] = []
        self._count = children
        self._listener: socket.socket | None = None
        self._stopping = False

    def slots(self, index: int) -> Slots:
        return Slots(self._counts, index, self._limit)

    def start(self, listener: socket.socket) -> None:
        """Start the children and wait until each one accepts on `listener`."""
        self._listener = listener
        started = [self._spawn(i) for i in range(self._count)]
        self._children = [process for process, _ in started]
        for process, ready in started:
            if not ready.wait(START_TIMEOUT_S):
                raise RuntimeError(
                    f"receiver process {process.pid} did not start (exit code {process.exitcode})"
                )

    def _spawn(self, child: int) -> tuple[BaseProcess, Event]:
        # A child that died took its associations with it: its count starts afresh.
        with self._counts.get_lock():
            self._counts[child + 1] = 0
        ready = self._context.Event()
        process = self._context.Process(
            target=_child,
            args=(self._spec, self._listener, self.slots(child + 1), ready),
            name="telerad-receiver",
            daemon=True,
        )
        process.start()
        return process, ready

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._children)

    def keep_alive(self) -> None:
        """Start again any child that died on its own (never while stopping)."""
        if self._stopping:
            return
        for i, process in enumerate(self._children):
            if not process.is_alive():
                log.error(
                    "receiver process %s exited with %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                self._children[i], _ = self._spawn(i)

    def stop(self, grace_s: float) -> None:
        self._stopping = True
        for process in self._children:
            process.terminate()
        for process in self._children:
            process.join(grace_s + 5)
            if process.is_alive():
                process.kill()
                process.join()
