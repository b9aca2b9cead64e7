"""Real gateway processes and real DICOM peers for the runtime tests.

Each gateway runs as `telerad gateway --config FILE` in its own process (so it can be
killed with SIGKILL), on free loopback ports, with its data in the test's tmp_path. dcmtk
comes from Debian (`make test` installs it); a missing tool fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2 as httpx
import obstore
import pydicom
import pytest
import yaml
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE

from telerad.api.config import HOT, GatewayConfig, ObjectStore, TLSFiles, WorkerConfig
from telerad.api.site import Completion, Notifications, Webhook
from telerad.devcluster.pki import CertificateAuthority
from telerad.runtime.gateway.example import ensure_keyring, ensure_token, example_config
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import StoredInstance
from telerad.runtime.store.objects import s3_store
from telerad.runtime.store.sql.catalog import SQLCatalog
from telerad.runtime.store.tier import Tier
from telerad.runtime.store.tiers import open_tiers
from telerad.runtime.worker.example import example_config as worker_example
from tests.conftest import CatalogFactory, S3Bucket

ROOT = Path(__file__).resolve().parents[2]
TELERAD = Path(sys.executable).parent / "telerad"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs dcmtk from Debian")
    return path


def serve_metrics(
    text: Callable[[], str], host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """An endpoint serving `text()` as Prometheus text at any path: recorded series standing
    in for what cannot run here (GPUs, DCGM exporters). Shut it down when done."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def launch(command: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`telerad COMMAND --config CONFIG`, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(TELERAD), command, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )


def await_healthy(
    proc: subprocess.Popen[bytes], log: Path, url: str, verify: str | bool
) -> subprocess.Popen[bytes]:
    """`proc` once its /healthz answers 200 (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1, verify=verify).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"{proc.args!r} not healthy after 30 s:\n{tail(log)}")


def run_healthy(
    command: str, config: Path, log: Path, url: str, verify: str | bool
) -> subprocess.Popen[bytes]:
    return await_healthy(launch(command, config, log), log, url, verify)


@dataclass
class GatewayProcess:
    config: GatewayConfig
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "gateway.log"
        self.token = ensure_token(self.config).read_text().strip() if self.config.tokens_dir else ""
        ensure_keyring(self.config)
        self.config_path = self.workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config.to_wire()))

    @property
    def port(self) -> int:
        return self.config.dicom_port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://127.0.0.1:{self.config.http_port}"

    @property
    def verify(self) -> str | bool:
        """With TLS the HTTP port's certificate is checked against the test CA."""
        tls = self.config.tls
        return str(tls.ca_file) if tls is not None and tls.ca_file is not None else True

    @property
    def ae_title(self) -> str:
        return self.config.ae_title

    @property
    def hot(self) -> Path:
        return self.config.storage.hot_dir

    def tier(self, name: str = HOT) -> Tier:
        """One of the gateway's tiers as it opens them (with its keyring)."""
        return open_tiers(self.config.storage)[name]

    def read_stored(self, path: Path | str) -> bytes:
        """A stored file's bytes as received (opened, when the site encrypts), by its
        path on disk or relative to the hot tier."""
        where = Path(path)
        relative = where.relative_to(self.hot) if where.is_absolute() else where
        return self.tier().read(PurePosixPath(relative))

    def objects(self) -> list[str]:
        """The paths of every instance file of the hot tier, where it keeps them."""
        store = self.config.storage.hot_store
        if store is None:
            return sorted(str(p.relative_to(self.hot)) for p in self.hot.rglob("*.dcm"))
        listed = obstore.list(s3_store(store), prefix="studies")
        return sorted(str(meta["path"]) for page in listed for meta in page)

    def start(self) -> None:
        self.launch()
        self.await_healthy()

    def launch(self) -> None:
        """Start the process without waiting for it: what it does first can be watched."""
        self.proc = launch("gateway", self.config_path, self.log)

    def await_healthy(self) -> None:
        assert self.proc is not None
        await_healthy(self.proc, self.log, self.url, self.verify)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    # -- HTTP -------------------------------------------------------------------
    @property
    def auth(self) -> dict[str, str]:
        """Headers of the example's local client."""
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(
            f"{self.url}{path}", params=params, headers=self.auth, timeout=10, verify=self.verify
        )
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}", json=body, headers=self.auth, timeout=10, verify=self.verify
        )

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10, verify=self.verify).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"condition not met in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)


GatewayFactory = Callable[..., GatewayProcess]

ON_DISK = pytest.mark.parametrize("hot_tier", ["disk"])
"""For a test that looks into the hot tier's directory (its files, temporaries, free
space, a file's bytes as stored): both catalogs, the hot tier on disk."""


@pytest.fixture
def hot_tier(request: pytest.FixtureRequest) -> str:
    """Where the hot tier's instances go, paired with the catalog's backend as sites are
    deployed: the embedded site (SQLite, a directory) and the scale-out one (PostgreSQL, a
    bucket of its own on the session's S3 server). So the runtime suite runs on both tiers
    and both catalogs in two runs, not four. A test that parametrizes this name picks its
    own (`disk` for what only a directory has)."""
    callspec = getattr(request.node, "callspec", None)
    catalog = callspec.params.get("new_catalog") if callspec is not None else None
    return "s3" if catalog == "postgresql" else "disk"


def object_store(bucket: S3Bucket, workdir: Path) -> ObjectStore:
    """A gateway's hot tier in `bucket`, its credentials in a file (as a mounted Secret)."""
    credentials = workdir / "s3-credentials"
    credentials.write_text("".join(f"{k}={v}\n" for k, v in bucket.credentials.items()))
    return ObjectStore(
        url=f"s3://{bucket.name}/{workdir.name}",
        endpoint=bucket.endpoint,
        region=bucket.region,
        credentials_file=credentials,
    )


@pytest.fixture
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    new_catalog: CatalogFactory,
    hot_tier: str,
    request: pytest.FixtureRequest,
) -> Iterator[GatewayFactory]:
    """Start gateways from the example config with field overrides (Python names), each
    with a catalog of its own on the backend under test unless `catalog` is given, and its
    hot tier where `hot_tier` says."""
    started: list[GatewayProcess] = []
    bucket: S3Bucket | None = request.getfixturevalue("s3") if hot_tier == "s3" else None

    def start(**overrides: Any) -> GatewayProcess:
        workdir = tmp_path_factory.mktemp("gateway")
        hot_store = object_store(bucket, workdir) if bucket is not None else None
        config = example_config(free_port(), free_port(), workdir / "data", hot=hot_store)
        # Each the only gateway of its site unless a test says otherwise: its start-up
        # sweep takes everything a crash left, as a one-replica site's does.
        storage = {"sweep_grace_seconds": 0, **overrides.pop("storage", {})}
        config = config.model_copy(
            update={
                "storage": config.storage.model_copy(update=storage),
                "catalog": overrides.pop("catalog", None) or new_catalog(),
                # Nothing balances across a test's gateways unless it says so: a stopping
                # one has no load balancer to wait for.
                "unready_seconds": 0,
                **overrides,
            }
        )
        gateway = GatewayProcess(GatewayConfig.model_validate(config.model_dump()), workdir)
        started.append(gateway)  # before start: one that never gets healthy is stopped too
        gateway.start()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway()


@dataclass(frozen=True)
class TlsMaterial:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path
    expired_cert: Path
    expired_key: Path

    def server_files(self, *, mutual: bool) -> TLSFiles:
        return TLSFiles(
            cert_file=self.server_cert,
            key_file=self.server_key,
            ca_file=self.ca,
            require_client_certificate=mutual,
        )


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority("telerad-test-ca")
    stranger_ca = CertificateAuthority("someone-else")
    files: dict[str, Path] = {}

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        files[name] = path
        return path

    write("ca.pem", ca.cert_pem)
    cert, key = ca.issue("gateway", dns_names=["localhost"], ips=["127.0.0.1"], server=True)
    write("server.pem", cert), write("server.key", key)
    cert, key = ca.issue("modality", client=True)
    write("client.pem", cert), write("client.key", key)
    cert, key = stranger_ca.issue("modality", client=True)
    write("stranger.pem", cert), write("stranger.key", key)
    cert, key = ca.issue("modality", client=True, expired=True)
    write("expired.pem", cert), write("expired.key", key)
    return TlsMaterial(
        ca=files["ca.pem"],
        server_cert=files["server.pem"],
        server_key=files["server.key"],
        client_cert=files["client.pem"],
        client_key=files["client.key"],
        stranger_cert=files["stranger.pem"],
        stranger_key=files["stranger.key"],
        expired_cert=files["expired.pem"],
        expired_key=files["expired.key"],
    )


def parts(response: httpx.Response) -> list[tuple[Any, bytes]]:
    """(Content-Type header, with its .params, and body) of each part of a multipart/related
    answer."""
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    assert message.is_multipart(), response.headers["content-type"]
    return [(p["Content-Type"], p.get_payload(decode=True)) for p in message.iter_parts()]


ANY_TRANSFER = 'multipart/related; type="application/dicom"; transfer-syntax=*'
"""WADO-RS, every instance as stored."""


def retrieved(gateway: GatewayProcess, study: str, series: str, sop: str) -> bytes:
    """The data set (after its file meta) that WADO-RS sends for one instance, as stored."""
    response = httpx.get(
        f"{gateway.url}/studies/{study}/series/{series}/instances/{sop}",
        headers={**gateway.auth, "Accept": ANY_TRANSFER},
        timeout=30,
    )
    assert response.status_code == 200, (sop, response.status_code, response.text[:300])
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1]
    stream = io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0])
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return stream.read()


def dataset_bytes(file: Path | bytes) -> tuple[str, bytes]:
    """(transfer syntax, the encoded data set after the file meta) of a Part 10 file."""
    raw = file if isinstance(file, bytes) else file.read_bytes()
    stream = io.BytesIO(raw)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    return str(meta.TransferSyntaxUID), raw[stream.tell() :]


def stored_files(hot: Path) -> dict[str, Path]:
    """SOP Instance UID (first version) -> stored file."""
    return {p.name.removesuffix(".dcm"): p for p in (hot / "studies").rglob("*.dcm")}


def stow_body(bodies: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request's body holding these encoded data sets, and its Content-Type."""
    boundary = "telerad-test-boundary-5f1c"
    content = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body + b"\r\n"
            for body in bodies
        )
        + f"--{boundary}--\r\n".encode()
    )
    return content, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(
    gateway: GatewayProcess, bodies: list[bytes], path: str = "/studies", **kw: str
) -> httpx.Response:
    """STOW-RS these encoded data sets in one multipart request."""
    content, content_type = stow_body(bodies)
    content_type = kw.get("content_type", content_type)
    return httpx.post(
        f"{gateway.url}{path}",
        content=content,
        headers={**gateway.auth, "Content-Type": content_type},
        timeout=30,
        verify=gateway.verify,
    )


@contextlib.contextmanager
def catalog(gateway: GatewayProcess) -> Iterator[SQLCatalog]:
    """The gateway's catalog, through its own backend (a second connection)."""
    opened = backends.open_site(gateway.config)
    assert isinstance(opened, SQLCatalog)
    try:
        yield opened
    finally:
        opened.close()


def stored(gateway: GatewayProcess) -> list[StoredInstance]:
    """Every version of every instance the gateway catalogued."""
    with catalog(gateway) as opened:
        return opened.stored()


def read_rows(gateway: GatewayProcess, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """What a statement reads from the catalog's tables, on whichever backend it has: for
    what no port shows (rows a deletion must leave behind)."""
    with catalog(gateway) as opened, opened.db.read() as tx:
        return list(tx.execute(sql, args).fetchall())


def audit_records(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The gateway's audit trail where its backend keeps it, in the order written: read
    from the `audit` table as the gateway's role, bound to its site (row-level security
    shows that site's rows only), or from the day files beside an SQLite catalog."""
    with catalog(gateway) as opened:
        if opened.backend == "postgresql":
            with opened.db.read() as tx:
                return [row[0] for row in tx.execute("SELECT record FROM audit ORDER BY id")]
    return [
        json.loads(line)
        for path in sorted((gateway.hot / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def age_studies(gateway: GatewayProcess, seconds: float) -> None:
    """As if every study's last instance came `seconds` earlier (with the gateway down)."""
    with catalog(gateway) as opened, opened.db.write() as tx:
        tx.execute("UPDATE studies SET last_received = last_received - ?", (seconds,))


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_kept(gateway: GatewayProcess, acknowledged: list[Path]) -> dict[str, str]:
    """Every acknowledged file is catalogued once and kept byte for byte (the data set;
    the file meta is the gateway's own); returns SOP Instance UID -> catalogued path."""
    rows = [(v.sop_uid, v.tier, v.path) for v in stored(gateway)]
    assert len(rows) == len({sop for sop, _, _ in rows}), "an instance catalogued twice"
    catalogued = {sop: path for sop, _, path in rows}
    for path in acknowledged:
        sop = sop_uid(path)
        assert sop in catalogued, f"{path.name} acknowledged but not catalogued"
        tier = next(t for s, t, _ in rows if s == sop)
        kept = gateway.tier(tier).read(PurePosixPath(catalogued[sop]))
        assert dataset_bytes(kept)[1] == dataset_bytes(path)[1], f"{path.name} differs"
    return catalogued


def temporaries(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*.tmp")]


def env_nodelay() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def send_datasets(
    gateway: GatewayProcess, datasets: list[Any], ae_title: str = "PYNETDICOM"
) -> list[int]:
    """C-STORE pydicom datasets over one association; their statuses in order."""
    ae = AE(ae_title=ae_title)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


# -- workers and what they cause --------------------------------------------------


@dataclass
class Sink:
    """A webhook receiver: records every POST (and, in `paths`, where it went); answers
    503 while `refusing`."""

    url: str = ""
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    refused: int = 0
    refusing: bool = False

    def accepted_keys(self) -> list[str]:
        return [headers["Idempotency-Key"] for headers, _ in self.received]


@pytest.fixture
def sink() -> Iterator[Sink]:
    state = Sink()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                if state.refusing:
                    state.refused += 1
                    self.send_response(503)
                else:
                    state.received.append((dict(self.headers), json.loads(body)))
                    state.paths.append(self.path)
                    self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


class WorkerProcess:
    def __init__(self, workdir: Path, config: WorkerConfig) -> None:
        self.config = config
        self.path = workdir / f"worker-{config.metrics_port}.yaml"
        self.path.write_text(yaml.safe_dump(config.to_wire()))
        self.log = workdir / f"worker-{config.metrics_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}"

    def start(self) -> WorkerProcess:
        self.proc = run_healthy("worker", self.path, self.log, self.url, True)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def log_tail(self) -> str:
        return tail(self.log)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(
        gateway: GatewayProcess, model: str = "ct-head-hyperdensity", **update: Any
    ) -> WorkerProcess:
        assert gateway.config.tokens_dir is not None
        token = gateway.config.tokens_dir / "local"
        config = worker_example(gateway.url, model, token, free_port())
        if gateway.config.tls is not None:  # HTTPS: the worker checks it against the CA
            endpoint = config.gateways[0].model_copy(update={"ca_file": gateway.config.tls.ca_file})
            config = config.model_copy(update={"gateways": [endpoint]})
        config = config.model_copy(update={"lease_seconds": 5, "poll_seconds": 0.2, **update})
        worker = WorkerProcess(tmp_path, WorkerConfig.model_validate(config.model_dump()))
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def storescu(gateway: GatewayProcess, files: list[Path]) -> None:
    command = [tool("storescu"), "-aet", "STORESCU", "-aec", gateway.ae_title]
    command += ["127.0.0.1", str(gateway.port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, env=env_nodelay(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def with_alerts(start_gateway: GatewayFactory, sink: Sink, **more: Any) -> GatewayProcess:
    return start_gateway(
        completion=Completion(quiet_seconds=1),
        notifications=Notifications(webhooks=[Webhook(name="on-call", url=sink.url)]),
        **more,
    )


def done_jobs(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [j for j in gateway.get("/jobs") if j["state"] == "done"]


def results(gateway: GatewayProcess, study_uid: str) -> list[dict[str, Any]]:
    return gateway.get(f"/studies/{study_uid}/instances", Modality="SR")  # type: ignore[no-any-return]
