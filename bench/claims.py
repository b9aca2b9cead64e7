"""Job claims through the gateway's HTTP API, on each catalog backend.

For each backend (SQLite in the hot tier, the default; PostgreSQL, a database on a
throwaway PostgreSQL 15 server this bench starts, fsync on), one gateway process,
``telerad gateway --config FILE`` from the example config with that ``catalog:``, and
claimers in this process calling ``POST /jobs/claim`` with the example's bearer token, one
keep-alive HTTP connection each.

Jobs are queued through the catalog's port, not by sending images: this process opens the
gateway's own catalog (``backends.open_site(config)``, a second connection, as a second
gateway of the site would) and for each job adds one CT head instance row (no file: a claim
reads none), then completes its study with a job for ``ct-head-hyperdensity``, the model
the example's routing gives a head CT. That is the same ``complete_study`` transaction the
gateway's completion sweep runs.

- claims/s: M jobs queued, then N claimers started at once, each claiming until the
  gateway answers 204 (nothing left); wall = start to the last job's claim answered. Every
  job must be claimed exactly once.
- enqueue-to-claim latency: one claimer polling as the worker does without work (a plain
  claim, then the worker's default ``pollSeconds`` when it got none); K jobs queued one at
  a time, each after a random pause (so that the poll's phase is random) and only once the
  previous one was claimed; latency = the claim's answer read minus ``complete_study``
  returned (committed, visible to every connection).

    .venv/bin/python bench/claims.py            # 1000 jobs, 40 latency samples
    .venv/bin/python bench/claims.py --quick    # 500 jobs, 15 samples
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import http.client
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from bench.ingest import free_port, http_get, machine_busy_seconds, machine_info, tree_cpu_seconds
from telerad.api.config import CatalogConfig, GatewayConfig, WorkerConfig
from telerad.api.jobs import ClaimRequest
from telerad.runtime.dataset import Header
from telerad.runtime.gateway.example import CT_HEAD, ensure_keyring, ensure_token, example_config
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import Catalog, NewJob, Received
from tests.postgres import BIN as POSTGRES_BIN
from tests.postgres import PostgresServer

TELERAD = Path(sys.executable).parent / "telerad"
BACKENDS = ("sqlite", "postgresql")
MODEL = CT_HEAD.name
RULE = "head-ct"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
POLL_S = WorkerConfig.model_fields["poll_seconds"].default
WAIT_S = 20
LEASE_S = 300
HTTP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """One `telerad gateway` process on a catalog, and the catalog as this process sees it."""

    def __init__(self, workdir: Path, catalog: CatalogConfig) -> None:
        example = example_config(free_port(), free_port(), workdir / "data")
        self.config = GatewayConfig.model_validate(
            example.model_copy(update={"catalog": catalog}).model_dump()
        )
        self.token = ensure_token(self.config).read_text().strip()
        ensure_keyring(self.config)
        self.priority = next(r.priority for r in self.config.routing if r.name == RULE)
        self.log = workdir / "gateway.log"
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(self.config.to_wire()))
        self.started = time.perf_counter()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(TELERAD), "gateway", "--config", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ready_s = self._await_healthy()
        self.catalog: Catalog = backends.open_site(self.config)
        self.studies = 0

    def _await_healthy(self) -> float:
        url = f"http://127.0.0.1:{self.config.http_port}/healthz"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the gateway exited with {self.proc.returncode}: {self.tail()}")
            if http_get(url)[0] == 200:
                return time.perf_counter() - self.started
            time.sleep(0.05)
        raise SystemExit(
            f"the gateway was not healthy within {START_TIMEOUT_S:.0f} s: {self.tail()}"
        )

    def tail(self) -> str:
        return "\n    ".join(self.log.read_text(errors="replace").splitlines()[-10:])

    def enqueue(self) -> int:
        """A new study of one CT head instance, completed with one job; the job's id."""
        self.studies += 1
        n = self.studies
        study = f"1.2.826.0.1.3680043.10.1011.{n}"
        header = Header(
            sop_class_uid=CT_IMAGE_STORAGE,
            sop_instance_uid=f"{study}.1.1",
            study_uid=study,
            series_uid=f"{study}.1",
            values={"Modality": "CT", "BodyPartExamined": "HEAD"},
        )
        path = PurePosixPath("studies", study, f"{header.sop_instance_uid}.dcm")
        received = Received(1, path, 1024, EXPLICIT_LE, "STORESCU")
        self.catalog.add_instance(header, received, time.time())
        summary = self.catalog.summary(study)
        job = NewJob(MODEL, priority=self.priority, rule=RULE, deidentify=False, notify=False)
        done = self.catalog.complete_study(
            study, summary.round, [job], time.time(), self.config.jobs.max_attempts
        )
        if done is None or len(done.jobs) != 1:
            raise SystemExit(f"study {n}: complete_study queued no job ({done})")
        return done.jobs[0].id

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self.catalog.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Claimer:
    """`POST /jobs/claim` over one keep-alive connection."""

    def __init__(self, gateway: Gateway, owner: str) -> None:
        self.conn = http.client.HTTPConnection(
            "127.0.0.1", gateway.config.http_port, timeout=HTTP_TIMEOUT_S
        )
        self.headers = {
            "Authorization": f"Bearer {gateway.token}",
            "Content-Type": "application/json",
        }
        request = ClaimRequest(model=MODEL, owner=owner, lease_seconds=LEASE_S)
        self.body = json.dumps(request.to_wire()).encode()

    def claim(self, wait: int = 0) -> int | None:
        """The claimed job's id, None when there is none to claim (within `wait` s)."""
        path = f"/jobs/claim?wait={wait}" if wait else "/jobs/claim"
        self.conn.request("POST", path, body=self.body, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status == 204:
            return None
        if response.status != 200:
            raise RuntimeError(f"POST /jobs/claim answered {response.status}: {data[:300]!r}")
        return int(json.loads(data)["id"])

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- measures


@dataclass
class Drain:
    backend: str
    claimers: int
    jobs: int
    wall_s: float = 0.0
    gateway_cpu_s: float = 0.0
    database_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    claimed: int = 0
    distinct: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.claimed == self.distinct == self.jobs


def drain(gateway: Gateway, backend: str, claimers: int, jobs: int, db_pid: int | None) -> Drain:
    result = Drain(backend, claimers, jobs)
    queued = {gateway.enqueue() for _ in range(jobs)}
    clients = [Claimer(gateway, f"bench-{claimers}-{i}") for i in range(claimers)]
    got: list[list[tuple[int, float]]] = [[] for _ in clients]
    start = threading.Barrier(claimers + 1)

    def run(i: int) -> None:
        start.wait()
        try:
            while (job := clients[i].claim()) is not None:
                got[i].append((job, time.perf_counter()))
        except (OSError, RuntimeError, http.client.HTTPException) as err:
            result.errors.append(f"claimer {i}: {err}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    cpu0 = gateway.cpu_seconds(), db_cpu(db_pid), time.process_time(), machine_busy_seconds()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    cpu1 = gateway.cpu_seconds(), db_cpu(db_pid), time.process_time(), machine_busy_seconds()
    for c in clients:
        c.close()
    times = [t for per in got for _, t in per]
    ids = [j for per in got for j, _ in per]
    result.wall_s = max(times, default=t0) - t0
    spent = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    result.gateway_cpu_s, result.database_cpu_s, result.client_cpu_s, busy = spent
    result.other_cpu_s = max(0.0, busy - sum(spent[:3]))
    result.claimed, result.distinct = len(ids), len(set(ids))
    if set(ids) != queued:
        result.errors.append(f"claimed {len(set(ids) & queued)} of the {jobs} queued jobs")
    return result


def db_cpu(pid: int | None) -> float:
    return 0.0 if pid is None else tree_cpu_seconds(pid)


@dataclass
class Latency:
    backend: str
    poll_s: float
    """The pause after a claim that got nothing; 0 for a claim that waits (`wait`)."""
    samples: list[float] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)


def latency(gateway: Gateway, backend: str, samples: int, poll_s: float) -> Latency:
    result = Latency(backend, poll_s)
    claimed: dict[int, float] = {}
    changed = threading.Condition()
    stopping = threading.Event()
    client = Claimer(gateway, "bench-poller")

    def poll() -> None:
        while not stopping.is_set():
            sent = time.perf_counter()
            job = client.claim(wait=0 if poll_s else WAIT_S)
            answered = time.perf_counter()
            if job is None:
                stopping.wait(poll_s)
                continue
            result.round_trips.append(answered - sent)
            with changed:
                claimed[job] = answered
                changed.notify_all()

    poller = threading.Thread(target=poll)
    poller.start()
    rng = random.Random(17)  # noqa: S311 (pauses, not secrets)
    limit = 10 + 2 * (poll_s or WAIT_S)
    try:
        for _ in range(samples):
            time.sleep(rng.uniform(0.1, 0.1 + (poll_s or POLL_S)))
            job = gateway.enqueue()
            queued = time.perf_counter()
            with changed:
                if not changed.wait_for(functools.partial(claimed.__contains__, job), limit):
                    raise SystemExit(f"{backend}: job {job} not claimed within {limit} s")
                result.samples.append(claimed[job] - queued)
    finally:
        stopping.set()
        poller.join()
        client.close()
    return result


# --------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def report(
    args: argparse.Namespace,
    drains: list[Drain],
    latencies: list[Latency],
    ready: dict[str, float],
    base: Path,
) -> None:
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"`{command}`, {datetime.date.today().isoformat()}, one run.")
    print()
    rev = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    postgres = subprocess.run(
        [str(POSTGRES_BIN / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    for line in [*machine_info(base)[:2], f"telerad at commit {rev}", f"PostgreSQL: {postgres}"]:
        print(f"- {line}")
    print()
    head = ["backend", "claimers", "jobs", "wall s", "claims/s", "gateway CPU s"]
    head += ["PostgreSQL CPU s", "client CPU s", "others' CPU s", "each claimed once"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 2) + "---|")
    for d in drains:
        rate = d.jobs / d.wall_s if d.wall_s else 0.0
        cells = [d.backend, str(d.claimers), str(d.jobs), f"{d.wall_s:.2f}", f"{rate:,.0f}"]
        cells.append(f"{d.gateway_cpu_s:.2f}")
        cells.append(f"{d.database_cpu_s:.2f}" if d.backend == "postgresql" else "-")
        cells += [f"{d.client_cpu_s:.2f}", f"{d.other_cpu_s:.2f}"]
        cells.append("yes" if d.ok else f"NO: {'; '.join(d.errors)}")
        print("| " + " | ".join(cells) + " |")
    print()
    head = ["backend", "claim", "samples", "p50 ms", "p95 ms", "max ms", "claim round trip p50 ms"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for lat in latencies:
        ms = [x * 1000 for x in lat.samples]
        how = f"plain, then {lat.poll_s:g} s pause" if lat.poll_s else f"wait={WAIT_S}"
        cells = [lat.backend, how, str(len(ms)), f"{percentile(ms, 0.5):.0f}"]
        cells += [f"{percentile(ms, 0.95):.0f}", f"{max(ms):.0f}"]
        cells.append(f"{statistics.median(lat.round_trips) * 1000:.1f}")
        print("| " + " | ".join(cells) + " |")
    print()
    print("Notes:")
    notes = [
        "jobs queued through the catalog's port from this process (add_instance of one CT "
        "head instance row, then complete_study with one NewJob for "
        f"{MODEL}), not by sending images; claims over HTTP: `POST /jobs/claim` "
        f'{{"model": "{MODEL}", "owner": ..., "leaseSeconds": {LEASE_S}}}, bearer token',
        "claims/s = jobs / wall, wall = the claimers' start to the last claimed job's "
        "answer; every job checked to be claimed exactly once; gateway CPU = user+sys of "
        "the gateway's process tree, PostgreSQL CPU = the postmaster's tree (its "
        "backends), client CPU = this process (the claimer threads), others' CPU = busy "
        "CPU of the whole machine (/proc/stat) minus those three, all over the drain: "
        "how disturbed it was",
        "claimers are threads of one Python process, each with one keep-alive connection; "
        "they share the machine's cores with the gateway and the database",
        f"latency: one claimer, either a plain claim then {POLL_S:g} s (WorkerConfig's "
        f"default pollSeconds) when it got nothing, or `POST /jobs/claim?wait={WAIT_S}` "
        "(answered when the job is queued: the catalog's notice); a job queued after a "
        f"random 0.1-{0.1 + POLL_S:g} s pause once the previous one was claimed; p95 is "
        "the nearest rank; `wait` only on PostgreSQL here, since this bench queues from "
        "another process than the gateway's and on SQLite only the gateway's own process "
        "queues jobs (the notice is in-process there)",
        "gateway start-to-healthy s: " + ", ".join(f"{k} {v:.2f}" for k, v in ready.items()),
        "SQLite: the example config's default catalog (catalog.sqlite in the hot tier); "
        "PostgreSQL: `catalog: {url: postgresql://DB@127.0.0.1:PORT/DB, passwordFile: "
        "FILE}`, one fresh database on a server started by tests/postgres.py (fsync on, "
        "synchronous_commit on)",
    ]
    for line in notes:
        print(f"- {line}")
    if args.keep:
        print(f"- logs kept in {base}")


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help=", ".join(BACKENDS))
    parser.add_argument("--claimers", default="1,4,16", help="concurrent claimers per drain")
    parser.add_argument("--jobs", type=int, default=None, help="per drain (default 1000)")
    parser.add_argument("--samples", type=int, default=None, help="latency (default 40)")
    parser.add_argument("--quick", action="store_true", help="500 jobs, 15 latency samples")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data")
    args = parser.parse_args()
    args.jobs = args.jobs or (500 if args.quick else 1000)
    args.samples = args.samples or (15 if args.quick else 40)
    args.claimers = [int(n) for n in args.claimers.split(",")]
    args.backends = args.backends.split(",")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    return args


@contextlib.contextmanager
def postgres_server(base: Path, wanted: bool) -> Iterator[PostgresServer | None]:
    if not wanted:
        yield None
        return
    workdir = base / "postgres"
    workdir.mkdir()
    server = PostgresServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.close()


def main() -> None:
    args = parse_args()
    drains: list[Drain] = []
    latencies: list[Latency] = []
    ready: dict[str, float] = {}
    base = Path(tempfile.mkdtemp(prefix="telerad-claims-"))
    try:
        with postgres_server(base, "postgresql" in args.backends) as server:
            for backend in args.backends:
                catalog, db_pid = CatalogConfig(), None
                if backend == "postgresql":
                    assert server is not None
                    db = server.create_database("claims")
                    catalog = CatalogConfig(url=db.url, password_file=db.password_file)
                    db_pid = server.pid
                workdir = base / backend
                workdir.mkdir()
                gateway = Gateway(workdir, catalog)
                ready[backend] = gateway.ready_s
                try:
                    for n in args.claimers:
                        d = drain(gateway, backend, n, args.jobs, db_pid)
                        drains.append(d)
                        rate = d.jobs / d.wall_s if d.wall_s else 0.0
                        print(f"{backend} x{n}: {rate:.0f} claims/s, ok={d.ok}", file=sys.stderr)
                    latencies.append(latency(gateway, backend, args.samples, POLL_S))
                    if backend == "postgresql":
                        latencies.append(latency(gateway, backend, args.samples, 0))
                finally:
                    gateway.close()
        report(args, drains, latencies, ready, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
