"""DICOMweb STOW-RS ingest and WADO-RS retrieval of a 300-slice CT: telerad (hot tier on
disk, and in an S3 bucket) vs Orthanc.

Same run, same machine, same files, same HTTP client. Servers:

- ``telerad``: ``telerad gateway --config FILE``, FILE from ``telerad gateway
  --example-config`` (fsync per stored instance); every request carries the bearer token
  that ``--example-config`` writes to ``DIR/tokens/local``.
- ``telerad-s3``: the same, with the hot tier in a bucket of a versitygw server the bench
  starts (bench/ingest.py's ``telerad-s3``).
- ``orthanc``: Orthanc with its DICOMweb plugin (``/dicom-web/``), its own JSON config:
  SyncStorageArea (fsync per stored file), no storage compression, no HTTP compression,
  the default SQLite index, no DICOM server, fresh storage/index directories.

Data: the synthetic head CT (``telerad.synthetic.ct_series(n_slices=300, size=512,
seed=0)``, written once with ``write_series`` and reused from ``--data-dir``), read into
memory before the runs; every request body is built before its timer starts.

Workloads, 4 parallel clients each (files split into 4 contiguous quarters):

1. STOW-RS, one instance per request (300 POST /studies): requests/s and MB/s.
2. STOW-RS, one multipart request per client holding its quarter of the study: MB/s.
3. WADO-RS, whole study (GET /studies/{uid}), R times per client: MB/s of received bodies;
   every answer must hold 300 parts.
4. WADO-RS, one instance per request (300 GETs), each answer must hold 1 part: requests/s.

Workload 1 runs on a freshly started, empty server. Workload 2 runs on another freshly
started, empty server, which then serves workloads 3 and 4 (the study it just stored).
After each STOW workload QIDO-RS must list 300 instances of the study.

The client is one Python process: aiohttp, one event loop, 4 tasks, each with its own
session holding one keep-alive connection; no Accept-Encoding (so neither server
compresses), bodies streamed and counted, never kept. Wall seconds run from the first
request to the last answer read. Recorded per workload: server CPU (user+sys of the
server process tree from /proc, as bench/ingest.py does), client CPU (this process) and
the busy CPU of the rest of the machine. Prints a Markdown section.

    .venv/bin/python bench/dicomweb.py                 # 3 repeats
    .venv/bin/python bench/dicomweb.py --quick         # 1 repeat, R = 1
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shlex
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # bench/ingest.py, a sibling script, not a package

CLIENTS = 4
SLICES = 300
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
JSON_ACCEPT = "application/dicom+json"
REQUEST_TIMEOUT_S = 600.0
READ_CHUNK = 1 << 20
SETTLE_S = 0.3
SYSTEMS = ("telerad", "telerad-s3", "orthanc")
LABELS = {"telerad": "telerad", "telerad-s3": "telerad-s3", "orthanc": "Orthanc"}
SHORT = {"telerad": "t", "telerad-s3": "s3", "orthanc": "O"}
RATIOS = (("telerad", "orthanc"), ("telerad-s3", "telerad"))
"""The ratios of the table: telerad against its peer, and the S3 hot tier against disk."""
# DICOM JSON tags in STOW-RS answers.
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"


class BenchError(Exception):
    """A server answered wrongly or not at all; the message says how."""


# --------------------------------------------------------------------------- servers


class OrthancWeb(ingest.Orthanc):
    """ingest.py's Orthanc with the DICOMweb plugin and without its DICOM server."""

    name = "orthanc"
    root = "/dicom-web"

    def config(self) -> dict[str, object]:
        cfg = {k: v for k, v in super().config().items() if not k.startswith("Dicom")}
        cfg.pop("MaximumPduLength", None)
        cfg.update(
            {
                "Name": "dicomweb-bench",
                "Plugins": [PLUGIN],
                "DicomServerEnabled": False,
                "DicomWeb": {"Enable": True, "Root": f"{self.root}/"},
                "HttpCompressionEnabled": False,
                "KeepAlive": True,
                "TcpNoDelay": True,
            }
        )
        return cfg

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        started = time.perf_counter()
        self.launch()
        self.wait_until(
            lambda: ingest.http_get(self.url(f"{self.root}/studies"))[0] == 200,
            f"GET {self.root}/studies",
        )
        self.ready_s = time.perf_counter() - started

    def base(self) -> str:
        return self.url(self.root)

    def auth(self) -> dict[str, str]:
        return {}

    def qido_query(self) -> str:
        return ""

    def plugin_version(self) -> str:
        status, body = ingest.http_get(self.url("/plugins/dicom-web"))
        return str(json.loads(body).get("Version", "?")) if status == 200 else "?"

    def issues(self) -> list[str]:
        """Orthanc's error lines, and its warning lines between start and stop (glog
        style, E/W + date; Orthanc 1.10 logs its start and stop messages as warnings)."""
        out, running = [], False
        for line in read_lines(self.log):
            if "Orthanc has started" in line or "Orthanc is stopping" in line:
                running = "started" in line
            elif line.startswith("E") or (running and re.match(r"^W\d{4} ", line)):
                out.append(line)
        return out

    def describe(self) -> str:
        shown = {
            k: v
            for k, v in self.config().items()
            if k not in ("StorageDirectory", "IndexDirectory", "HttpPort")
        }
        return (
            f"`/usr/sbin/Orthanc orthanc.json`, fresh storage and index dirs, "
            f"{json.dumps(shown)}; other settings Orthanc's defaults"
        )


class TeleradWeb(ingest.Telerad):
    """ingest.py's telerad, ready when /healthz answers, with its bearer token."""

    name = "telerad"
    # ingest.py's describe() is about DIMSE; this one is the DICOMweb server's.
    web_describe = (
        "`telerad gateway --config gateway.yaml`, gateway.yaml = the output of "
        "`telerad gateway --example-config --port PORT --http-port PORT --data-dir DIR`, "
        "token from DIR/tokens/local"
    )

    def __init__(self, settings: ingest.Settings) -> None:
        super().__init__(settings)
        self.token = ""

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = ingest.free_port()
        started = time.perf_counter()
        self.launch()  # waits for GET /healthz
        loaded = yaml.safe_load(self.config_text)
        tokens = Path(loaded.get("tokensDir") or self.data / "tokens")
        try:
            self.token = (tokens / "local").read_text().strip()
        except OSError as err:
            raise ingest.ReceiverError(f"telerad: no bearer token: {err}") from err
        self.ready_s = time.perf_counter() - started

    def base(self) -> str:
        return self.url("")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def qido_query(self) -> str:
        return "?limit=1000"

    def issues(self) -> list[str]:
        lines = read_lines(self.log)
        return [ln for ln in lines if re.search(r"ERROR|WARNING|CRITICAL|Traceback", ln)]

    def describe(self) -> str:
        return self.web_describe


class TeleradWebS3(TeleradWeb, ingest.TeleradS3):
    """As telerad, with ingest.py's S3 hot tier (its configured(): a fresh bucket)."""

    name = "telerad-s3"

    def describe(self) -> str:
        return f"{self.web_describe}; {ingest.TeleradS3.describe(self)}"


Server = TeleradWeb | OrthancWeb


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def make_server(name: str, settings: ingest.Settings) -> Server:
    kinds: dict[str, type[Server]] = {
        "telerad": TeleradWeb,
        "telerad-s3": TeleradWebS3,
        "orthanc": OrthancWeb,
    }
    return kinds[name](settings)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Instance:
    name: str
    data: bytes
    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Study:
    uid: str
    instances: tuple[Instance, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(i.data) for i in self.instances)

    def quarters(self) -> list[list[Instance]]:
        by_name = {i.name: i for i in self.instances}
        names = [i.name for i in self.instances]
        return [[by_name[n] for n in q] for q in ingest.split(names, CLIENTS)]


def load_study(data_dir: Path) -> Study:
    root, names = ingest.synthetic_files(data_dir, "ct", SLICES)
    instances = []
    for name in names:
        path = root / name
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        instances.append(Instance(name, path.read_bytes(), *uids))
    studies = {i.study for i in instances}
    if len(studies) != 1:
        raise SystemExit(f"{root}: expected one study, found {len(studies)}")
    return Study(studies.pop(), tuple(instances))


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None
    payload: int = 0  # DICOM bytes in the body
    parts: int = 0  # multipart parts the answer must hold (0: a STOW answer, kept)


@dataclass
class Tally:
    requests: int = 0
    received: int = 0
    sent: int = 0
    stow_answers: list[tuple[int, bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def boundary_of(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise BenchError(f"no boundary in Content-Type {content_type!r}")
    return match.group(1).encode()


async def exchange(session: aiohttp.ClientSession, req: Request, tally: Tally) -> None:
    async with session.request(req.method, req.url, headers=req.headers, data=req.body) as resp:
        tally.requests += 1
        tally.sent += req.payload
        if resp.status != 200:
            text = (await resp.read())[:300].decode(errors="replace")
            tally.errors.append(f"{req.method} {req.url}: {resp.status} {text}")
            return
        if not req.parts:
            body = await resp.read()
            tally.received += len(body)
            tally.stow_answers.append((req.payload, body))
            return
        # Count the delimiters (`--boundary`, the closing one included) while streaming.
        delimiter = b"--" + boundary_of(resp.headers.get("Content-Type", ""))
        tail, count = b"", 0
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            tally.received += len(chunk)
            window = tail + chunk[: len(delimiter) - 1] if tail else b""
            count += window.count(delimiter) + chunk.count(delimiter)
            tail = chunk[-(len(delimiter) - 1) :]
        if count - 1 != req.parts:
            tally.errors.append(
                f"GET {req.url}: {count - 1} parts in the answer, expected {req.parts}"
            )


async def client(requests: Sequence[Request], tally: Tally) -> None:
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=["Accept-Encoding"],
        read_bufsize=READ_CHUNK,
    ) as session:
        for req in requests:
            try:
                await exchange(session, req, tally)
            except (aiohttp.ClientError, TimeoutError, BenchError) as err:
                tally.errors.append(f"{req.method} {req.url}: {type(err).__name__}: {err}")


@dataclass
class Drive:
    wall_s: float
    client_cpu_s: float
    tallies: list[Tally]


async def drive_async(groups: Sequence[Sequence[Request]]) -> Drive:
    tallies = [Tally() for _ in groups]
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(g, t) for g, t in zip(groups, tallies, strict=True)))
    wall = time.perf_counter() - start
    return Drive(wall, time.process_time() - cpu0, tallies)


def drive(groups: Sequence[Sequence[Request]]) -> Drive:
    return asyncio.run(drive_async(groups))


def multipart_body(instances: Sequence[Instance]) -> tuple[str, bytes]:
    boundary = secrets.token_hex(16)
    chunks: list[bytes] = []
    for inst in instances:
        if boundary.encode() in inst.data:
            raise SystemExit("the random boundary occurs in an instance; run again")
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()]
        chunks += [inst.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return content_type, b"".join(chunks)


def stow_request(server: Server, instances: Sequence[Instance]) -> Request:
    content_type, body = multipart_body(instances)
    headers = {**server.auth(), "Content-Type": content_type, "Accept": JSON_ACCEPT}
    payload = sum(len(i.data) for i in instances)
    return Request("POST", f"{server.base()}/studies", headers, body, payload, 0)


def wado_request(server: Server, path: str, parts: int) -> Request:
    headers = {**server.auth(), "Accept": DICOM_ACCEPT}
    return Request("GET", f"{server.base()}{path}", headers, None, 0, parts)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    unit: str


WORKLOADS = (
    Workload("stow1", f"STOW-RS, 1 instance/request, {CLIENTS} clients", "req/s (MB/s)"),
    Workload("stowq", f"STOW-RS, 1 request of {SLICES // CLIENTS} instances per client", "MB/s"),
    Workload("wado", f"WADO-RS whole study, {CLIENTS} clients x R", "MB/s"),
    Workload("wado1", f"WADO-RS, 1 instance/request, {CLIENTS} clients", "req/s"),
)


@dataclass
class Run:
    workload: str
    system: str
    requests: int = 0
    nbytes: int = 0  # STOW: DICOM bytes sent; WADO: body bytes received
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.wall_s > 0

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def mbs(self) -> float:
        return self.nbytes / self.wall_s / 1e6 if self.wall_s else 0.0


def stow_check(answers: Sequence[tuple[int, bytes]], expected: Sequence[int]) -> list[str]:
    """Every STOW-RS answer lists as many stored instances as its request held parts."""
    errors = []
    for (_, body), parts in zip(answers, expected, strict=True):
        try:
            doc: Any = json.loads(body)
            stored = len(doc.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []))
            failed = len(doc.get(FAILED_SOP_SEQUENCE, {}).get("Value", []))
        except (ValueError, AttributeError) as err:
            errors.append(f"STOW answer is not DICOM JSON: {err}")
            continue
        if stored != parts or failed:
            errors.append(f"STOW answer: {stored}/{parts} stored, {failed} failed")
    return errors


def measure(server: Server, run: Run, groups: Sequence[Sequence[Request]]) -> Drive:
    cpu0, busy0 = ingest.receiver_cpu_seconds(server), ingest.machine_busy_seconds()
    result = drive(groups)
    time.sleep(SETTLE_S)
    run.server_cpu_s = ingest.receiver_cpu_seconds(server) - cpu0
    busy = ingest.machine_busy_seconds() - busy0
    run.wall_s, run.client_cpu_s = result.wall_s, result.client_cpu_s
    run.other_cpu_s = max(0.0, busy - run.server_cpu_s - run.client_cpu_s)
    run.requests = sum(t.requests for t in result.tallies)
    for tally in result.tallies:
        run.errors += tally.errors
    status = server.exited()
    if status is not None:
        run.errors.append(f"{server.name} exited with status {status} during the run")
    return result


def run_stow(server: Server, study: Study, key: str) -> Run:
    run = Run(key, server.name)
    if key == "stow1":
        groups = [[stow_request(server, [i]) for i in q] for q in study.quarters()]
    else:
        groups = [[stow_request(server, q)] for q in study.quarters()]
    result = measure(server, run, groups)
    run.nbytes = sum(t.sent for t in result.tallies)
    for tally, quarter in zip(result.tallies, study.quarters(), strict=True):
        parts = [1] * len(quarter) if key == "stow1" else [len(quarter)]
        if len(tally.stow_answers) == len(parts):  # else the errors say why already
            run.errors += stow_check(tally.stow_answers, parts)
    run.errors += qido_check(server, study)
    return run


def run_wado(server: Server, study: Study, key: str, rounds: int) -> Run:
    run = Run(key, server.name)
    if key == "wado":
        one = wado_request(server, f"/studies/{study.uid}", len(study.instances))
        groups = [[one] * rounds for _ in range(CLIENTS)]
    else:
        groups = [
            [
                wado_request(server, f"/studies/{i.study}/series/{i.series}/instances/{i.sop}", 1)
                for i in q
            ]
            for q in study.quarters()
        ]
    result = measure(server, run, groups)
    run.nbytes = sum(t.received for t in result.tallies)
    return run


def qido_check(server: Server, study: Study) -> list[str]:
    url = f"{server.base()}/studies/{study.uid}/instances{server.qido_query()}"
    req = urllib.request.Request(url, headers={**server.auth(), "Accept": JSON_ACCEPT})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback)
            found = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        return [f"QIDO {url}: {err}"]
    if not isinstance(found, list) or len(found) != len(study.instances):
        count = len(found) if isinstance(found, list) else type(found).__name__
        return [f"QIDO {url}: {count} instances listed, expected {len(study.instances)}"]
    return []


# --------------------------------------------------------------------------- runs


@dataclass
class Session:
    """One freshly started server on empty storage, for one or more workloads."""

    server: Server
    base: Path
    issues: list[str] = field(default_factory=list)
    idle_cores: float = 0.0

    def __enter__(self) -> Server:
        quiet_check()
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.server.name}-", dir=self.base))
        self.server.start(workdir)
        self.idle_cores = settle(self.server)
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.issues += self.server.issues()
        self.server.stop()
        # Stored files stay until the end (see ingest.KEEP_NOTE); sync so that no dirty
        # pages of this run are written back during the next one.
        os.sync()


BUSY_BEFORE: list[float] = []  # cores busy before a server start, when over the limit


def quiet_check(seconds: float = 1.0, limit: float = 0.15) -> None:
    """Warn when the machine is busy before a server starts (anything else running)."""
    busy0 = ingest.machine_busy_seconds()
    time.sleep(seconds)
    cores = (ingest.machine_busy_seconds() - busy0) / seconds
    if cores > limit:
        print(f"warning: {cores:.2f} cores busy before a server start", file=sys.stderr)
        BUSY_BEFORE.append(cores)


def settle(server: Server, step: float = 0.5, idle: float = 0.02, limit: float = 5.0) -> float:
    """Wait (at most `limit` s) until the just-started server's process tree uses under
    `idle` CPU seconds in `step` s, so the end of its start-up is not measured; then
    return the cores it keeps busy while idle, measured over one more second."""
    started = time.monotonic()
    cpu = ingest.receiver_cpu_seconds(server)
    while time.monotonic() - started < limit:
        time.sleep(step)
        now = ingest.receiver_cpu_seconds(server)
        if now - cpu < idle:
            break
        cpu = now
    cpu, t0 = ingest.receiver_cpu_seconds(server), time.perf_counter()
    time.sleep(1.0)
    return (ingest.receiver_cpu_seconds(server) - cpu) / (time.perf_counter() - t0)


def progress(run: Run, rep: int, repeats: int) -> None:
    status = "ok" if run.ok else "FAILED"
    print(
        f"[{rep + 1}/{repeats}] {run.workload} {run.system}: {run.rate:.1f} req/s, "
        f"{run.mbs:.1f} MB/s, {run.wall_s:.2f} s, server CPU {run.server_cpu_s:.2f} s, "
        f"client CPU {run.client_cpu_s:.2f} s, others {run.other_cpu_s:.2f} s, {status}",
        file=sys.stderr,
    )
    for err in run.errors[:10]:
        print(f"    {err}", file=sys.stderr)


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    issues: dict[str, list[str]] = field(default_factory=dict)
    ready_s: dict[str, list[float]] = field(default_factory=dict)
    idle_cores: dict[str, list[float]] = field(default_factory=dict)
    plugin: str = "?"


def one_system(
    server: Server, study: Study, args: argparse.Namespace, base: Path, out: Results, *, rep: int
) -> None:
    sessions = [Session(server, base), Session(server, base)]
    try:
        with sessions[0] as srv:
            out.ready_s.setdefault(srv.name, []).append(srv.ready_s)
            runs = [run_stow(srv, study, "stow1")]
        with sessions[1] as srv:
            out.ready_s.setdefault(srv.name, []).append(srv.ready_s)
            if isinstance(srv, OrthancWeb) and out.plugin == "?":
                out.plugin = srv.plugin_version()
            runs.append(run_stow(srv, study, "stowq"))
            runs.append(run_wado(srv, study, "wado", args.rounds))
            runs.append(run_wado(srv, study, "wado1", 1))
    except ingest.ReceiverError as err:
        raise SystemExit(f"{server.name}: {err}") from err
    finally:
        for s in sessions:
            out.issues.setdefault(server.name, []).extend(s.issues)
            out.idle_cores.setdefault(server.name, []).append(s.idle_cores)
    for run in runs:
        out.runs.append(run)
        progress(run, rep, args.repeats)


def _settings(base: Path, args: argparse.Namespace) -> ingest.Settings:
    """The ingest bench's receiver settings, for the two systems here: both on their
    embedded catalogs, so the run's PostgreSQL is never started."""
    postgres = ingest.SharedPostgres(base / "postgres")
    s3 = ingest.SharedS3(base / "s3")
    return ingest.Settings(base, "unset", args.telerad, postgres, index_connections=1, s3=s3)


def run_all(study: Study, args: argparse.Namespace, base: Path) -> Results:
    settings = _settings(base, args)
    servers = [make_server(name, settings) for name in SYSTEMS]
    out = Results()
    try:
        for rep in range(args.repeats):
            for server in servers:
                one_system(server, study, args, base, out, rep=rep)
    finally:
        assert settings.s3 is not None
        settings.s3.close()
    return out


# --------------------------------------------------------------------------- report


def machine_lines(base: Path) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    processors = sum(1 for line in cpuinfo if line.startswith("processor"))
    models = {line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")}
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return [
        f"CPU: {processors} x {', '.join(sorted(models)) or 'unknown'} (/proc/cpuinfo), "
        f"{mem_kib / 2**20:.0f} GiB RAM",
        f"kernel {platform.release()} ({platform.machine()}), Python {platform.python_version()}"
        f", aiohttp {aiohttp.__version__}",
        ingest.machine_info(base)[2],
    ]


def version_lines(telerad: Path, plugin: str) -> list[str]:
    here = str(Path(__file__).resolve().parent)
    rev = ingest.first_line(["git", "-C", here, "rev-parse", "HEAD"])[:12]
    dirty = ingest.first_line(["git", "-C", here, "status", "--porcelain"]) != "(no output)"
    try:
        version = importlib.metadata.version("telerad")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return [
        f"Orthanc: {ingest.first_line(['/usr/sbin/Orthanc', '--version'])}, "
        f"DICOMweb plugin {plugin} ({PLUGIN})",
        f"telerad {version}: {telerad}, working tree at commit {rev}"
        + (" with uncommitted changes" if dirty else ""),
    ]


def med(runs: Sequence[Run], attr: str) -> float:
    return statistics.median(float(getattr(r, attr)) for r in runs) if runs else 0.0


def main_value(wl: Workload, runs: Sequence[Run]) -> float:
    return med(runs, "rate") if wl.key in ("stow1", "wado1") else med(runs, "mbs")


def cell(wl: Workload, runs: Sequence[Run]) -> str:
    if not runs:
        return "-"
    if wl.key == "stow1":
        return f"{med(runs, 'rate'):,.0f} ({med(runs, 'mbs'):,.1f})"
    if wl.key == "wado1":
        return f"{med(runs, 'rate'):,.0f}"
    return f"{med(runs, 'mbs'):,.1f}"


def pair(runs: dict[str, list[Run]], attr: str) -> str:
    return " / ".join(f"{med(runs[s], attr):.2f}" if runs[s] else "-" for s in SYSTEMS)


def table(results: Results, rounds: int) -> list[str]:
    short = " / ".join(SHORT[s] for s in SYSTEMS)
    head = ["workload", "unit", *(LABELS[s] for s in SYSTEMS)]
    head += [f"{LABELS[a]} / {LABELS[b]}" for a, b in RATIOS]
    head += [f"server CPU s ({short})", f"client CPU s ({short})", f"others' CPU s ({short})"]
    head += [f"wall s ({short})", f"ok runs ({short})"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for wl in WORKLOADS:
        every = {
            s: [r for r in results.runs if r.workload == wl.key and r.system == s] for s in SYSTEMS
        }
        good = {s: [r for r in rs if r.ok] or rs for s, rs in every.items()}
        values = {s: main_value(wl, good[s]) for s in SYSTEMS}
        ratios = [f"{values[a] / values[b]:.2f}" if values[b] else "-" for a, b in RATIOS]
        label = wl.label.replace("x R", f"x {rounds}")
        cells = [label, wl.unit, *(cell(wl, good[s]) for s in SYSTEMS), *ratios]
        cells += [pair(good, a) for a in ("server_cpu_s", "client_cpu_s", "other_cpu_s")]
        cells.append(pair(good, "wall_s"))
        cells.append(" / ".join(f"{sum(r.ok for r in every[s])}/{len(every[s])}" for s in SYSTEMS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def notes(results: Results, study: Study, rounds: int, servers: list[Server]) -> list[str]:
    per_instance = study.nbytes / len(study.instances)
    out = [
        f"data: {len(study.instances)} instances, {study.nbytes / 1e6:.1f} MB of Part 10 files "
        f"({per_instance / 1e3:.0f} kB each), synthetic head CT 512x512 16-bit, read into "
        "memory before the runs (request bodies built before the timer starts)",
        "client: this Python process, aiohttp, one event loop, 4 tasks each with its own "
        "session and one keep-alive connection, no Accept-Encoding, answers streamed; "
        "STOW parts `Content-Type: application/dicom`, WADO `Accept: "
        f"{DICOM_ACCEPT}`; telerad requests carry `Authorization: Bearer`",
        "MB = 10^6 bytes; STOW MB/s = DICOM bytes sent / wall; WADO MB/s = answer body "
        f"bytes received (multipart framing included) / wall; whole-study WADO = "
        f"{CLIENTS} x {rounds} GET /studies/{{uid}} at once, each answer checked to hold "
        f"{len(study.instances)} parts; per-instance WADO answers checked to hold 1 part; "
        "every STOW answer checked to list all its instances as stored and none failed; "
        f"QIDO after each STOW workload checked to list {len(study.instances)} instances",
        "wall = first request sent to last answer read; server CPU = user+sys of the server "
        f"process tree (/proc) over the workload + {SETTLE_S} s; client CPU = this process "
        "over the workload (1.00 per wall second = one core saturated); others' CPU = busy "
        "CPU of the whole machine (/proc/stat) minus both (kernel threads: writeback, "
        "softirq, ...); all columns are medians over the repeats, ratios of the median "
        "rates (telerad / Orthanc > 1: telerad faster; telerad-s3 / telerad: the S3 hot "
        "tier against the directory, goal >= 0.8 for whole-study WADO)",
        "per repeat and system: a fresh server on empty storage for STOW 1/request; another "
        "fresh server for STOW of quarters, then whole-study WADO, then per-instance WADO "
        "on what it just stored (its files in the page cache); the systems take "
        "turns; client and server share the machine's cores",
        ingest.KEEP_NOTE,
    ]
    out += [f"{s.name}: {s.describe()}" for s in servers]
    sizes = {
        LABELS[s]: statistics.median(r.nbytes / r.requests for r in rs)
        for s in SYSTEMS
        if (rs := [r for r in results.runs if r.workload == "wado" and r.system == s and r.ok])
    }
    if sizes:
        out.append(
            "median answer body of GET /studies/{uid}: "
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
        )
    if BUSY_BEFORE:
        out.append(
            f"the machine was not idle before {len(BUSY_BEFORE)} server start(s), up to "
            f"{max(BUSY_BEFORE):.2f} cores busy over 1 s: something else was running, "
            "figures may be disturbed"
        )
    else:
        out.append("the machine was idle (< 0.15 cores busy over 1 s) before every server start")
    out.append(
        "median start-to-ready s: "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in results.ready_s.items())
        + "; then each session waits (at most 5 s) until the server's process tree uses "
        "< 0.02 CPU s in 0.5 s, and measures the CPU it uses idle over 1 s; median idle "
        "cores: "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in results.idle_cores.items())
        + " (included in its server CPU figures, taken from the same process tree)"
    )
    for name, lines in results.issues.items():
        unique = list(dict.fromkeys(re.sub(r"^\S+ \S+ ", "", ln)[:200] for ln in lines))
        if unique:
            shown = "; ".join(f"`{ln}`" for ln in unique[:5])
            out.append(f"{name} logged {len(lines)} warning/error lines, e.g. {shown}")
        else:
            out.append(f"{name} logged no warning or error lines")
    for run in results.runs:
        if not run.ok:
            errs = "; ".join(run.errors[:3]) or "no time measured"
            out.append(f"FAILED run: {run.workload} {run.system}: {errs}")
    return out


def render(args: argparse.Namespace, results: Results, study: Study, base: Path) -> str:
    settings = _settings(base, args)
    servers = [make_server(name, settings) for name in SYSTEMS]
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    today = datetime.date.today().isoformat()
    lines = [
        f"## DICOMweb: STOW-RS and WADO-RS of a {len(study.instances)}-slice CT, "
        "telerad (disk, S3) vs Orthanc",
        "",
        f"`{command}`, {today}, {args.repeats} repeat(s), medians.",
        "",
    ]
    lines += [
        f"- {ln}" for ln in [*machine_lines(base), *version_lines(args.telerad, results.plugin)]
    ]
    lines += ["", *table(results, args.rounds), "", "Notes:", ""]
    lines += [f"- {ln}" for ln in notes(results, study, args.rounds, servers)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, R = 1")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="R, default 3 (quick 1)")
    parser.add_argument("--data-dir", type=Path, help="keep generated data here and reuse it")
    parser.add_argument("--tmp-dir", type=Path, help="servers' storage (default: $TMPDIR)")
    parser.add_argument("--telerad", type=Path, default=Path(sys.executable).parent / "telerad")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    args.telerad = args.telerad.absolute()  # the servers run in their own directories
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/usr/sbin/Orthanc").exists() or not Path(PLUGIN).exists():
        raise SystemExit(f"needs /usr/sbin/Orthanc and {PLUGIN} (orthanc, orthanc-dicomweb)")
    with tempfile.TemporaryDirectory(prefix="telerad-dicomweb-", dir=args.tmp_dir) as tmp:
        base = Path(tmp)
        study = load_study(args.data_dir or base / "data")
        results = run_all(study, args, base)
        text = render(args, results, study, base)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0 if all(r.ok for r in results.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
