"""DICOM C-STORE ingest: dcmtk storescu sending to several receivers, side by side.

Same run, same machine, same files, same sender. Receivers:

- ``storescp``: dcmtk storescp, bit-preserving, 128 KiB PDUs, one process per association
  (``--fork``), no fsync (storescp has no fsync option).
- ``storescp-fsync``: the same, with a tiny LD_PRELOAD library (compiled here with ``cc``)
  that calls fsync() on every regular file written by storescp right before it is closed,
  which is before the C-STORE response goes out: the same guarantee as Orthanc's
  ``SyncStorageArea``, without a process per file.
- ``storescp-execsync``: the same with ``--exec-on-reception 'sync -d #p/#f' --exec-sync``:
  the documented way to get storescp to sync, at the cost of sh+sync per file. It runs
  after the C-STORE response is sent (but before the next request is read).
- ``orthanc``: Orthanc with its own JSON config, SyncStorageArea, no compression, the
  default SQLite index, fresh storage/index directories.
- ``orthanc-postgresql``: the same with its index in PostgreSQL (Debian's
  orthanc-postgresql index plugin; the files stay on the file system).
- ``telerad``: ``telerad gateway --config FILE``, FILE from ``telerad gateway
  --example-config`` (which encrypts at rest: AES-256-GCM, docs/encryption.md).
- ``telerad-plain``: the same without ``storage.encryption``: what sealing costs.
- ``telerad-s3``: the example's (encrypted) with ``storage.hotStore`` in a bucket of a
  versitygw server the bench starts (tests/s3.py, its POSIX backend; no fsync there).
- ``telerad-postgresql``: the same with ``catalog: {url, passwordFile}`` naming a
  PostgreSQL database.

The two PostgreSQL receivers share one throwaway PostgreSQL 15 server that the bench starts
(tests/postgres.py, fsync on) and get a fresh database of their own for every run.

Every run starts the receiver afresh on empty storage, runs 1 or N storescu processes at
once (files split into N contiguous groups), and records wall seconds from the first
storescu start to the last storescu exit, receiver CPU (user+sys of the receiver and its
descendants from /proc) and the count the receiver reports. Prints a Markdown table.

storescu runs with TCP_NODELAY=1 (dcmtk's switch; this build leaves Nagle on otherwise),
except in the short "Nagle on" workload. The dcmtk-based receivers (storescp, Orthanc) get
TCP_NODELAY=1 too (``--receiver-tcp-nodelay``): without it each C-STORE response waits
for a 40 ms delayed ACK and every dcmtk receiver runs at ~22 instances/s.

    .venv/bin/python bench/ingest.py                       # all receivers, 3 repeats
    .venv/bin/python bench/ingest.py --receivers storescp,orthanc --quick
    .venv/bin/python bench/ingest.py --quick \
        --receivers telerad,telerad-postgresql,orthanc,orthanc-postgresql
"""

from __future__ import annotations

import abc
import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
import yaml

from tests.postgres import BIN as POSTGRES_BIN
from tests.postgres import DatabaseInfo, PostgresServer
from tests.s3 import S3Server

MAX_PDU = 131072
SENDER_AET = "STORESCU"
ECHO_AET = "ECHOSCU"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SEND_TIMEOUT_S = 900.0
COUNT_TIMEOUT_S = 30.0
SETTLE_S = 0.3
KEEP_NOTE = (
    "received files are kept until the whole benchmark ends and only then deleted: ext4 "
    "skips recently deleted inodes when it allocates new ones (recently_deleted() in "
    "find_inode_bit), so creating thousands of files right after deleting the previous "
    "run's thousands cost several times more system CPU in the receiver"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BASELINE = "storescp"
FSYNC_BASELINE = "storescp-fsync"
ALL_RECEIVERS = (
    "storescp",
    "storescp-fsync",
    "storescp-execsync",
    "orthanc",
    "orthanc-postgresql",
    "telerad",
    "telerad-plain",
    "telerad-s3",
    "telerad-postgresql",
)
POSTGRES_INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
# The goals of issues 17 (the PostgreSQL catalog) and 18 (encryption at rest costs under
# 10 %), as (receiver, peer, least ratio of median inst/s).
GOALS = (
    ("telerad-postgresql", "orthanc-postgresql", 1.5),
    ("telerad-postgresql", "telerad", 0.8),
    ("telerad", "telerad-plain", 0.9),
    ("telerad-s3", "telerad-plain", 0.7),
)
DEFAULT_RECEIVERS = ",".join(ALL_RECEIVERS)

FSYNC_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* fsync() every regular file opened for writing right before it is closed. */
static int written_regular(int fd) {
    struct stat st;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY) return 0;
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

int fclose(FILE *f) {
    static int (*real)(FILE *);
    if (!real) real = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (f) {
        int fd = fileno(f);
        if (fd >= 0 && written_regular(fd) && fflush(f) == 0) fsync(fd);
    }
    return real(f);
}

int close(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (written_regular(fd)) fsync(fd);
    return real(fd);
}
"""


class ReceiverError(Exception):
    """A receiver could not be started or stopped working; the message says why."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Status and body, or (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def echo_ok(port: int, called_ae: str) -> bool:
    argv = ["echoscu", "-aet", ECHO_AET, "-aec", called_ae, "-to", "5", "127.0.0.1", str(port)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    ".join(text[-lines:]) or "(empty log)"


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime+stime+cutime+cstime in clock ticks), None once the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of root and every live or zombie descendant, reaped children included.

    A child's time moves into its parent's cutime/cstime when it is reaped, so summing all
    four fields over the current tree counts every process once.
    """
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            ticks += stats[pid][1]
        todo.extend(children.get(pid, []))
    return ticks / CLOCK_TICKS


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal the process group of a receiver this script started (its leader unreaped)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return


def receiver_env(tcp_nodelay: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if tcp_nodelay != "unset":
        env["TCP_NODELAY"] = tcp_nodelay
    return env


# --------------------------------------------------------------------------- receivers


class SharedPostgres:
    """The one PostgreSQL server of the run, started on first use; a database per run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server: PostgresServer | None = None
        self.failed = ""
        self.created = 0

    def database(self, prefix: str) -> DatabaseInfo:
        if self.failed:
            raise ReceiverError(self.failed)
        try:
            if self.server is None:
                self.workdir.mkdir(exist_ok=True)
                self.server = PostgresServer(self.workdir)
                self.server.start()
            self.created += 1
            return self.server.create_database(f"{prefix}_{self.created}")
        # PostgresMissing and a failed pg_ctl are RuntimeErrors.
        except (RuntimeError, OSError, psycopg.Error) as err:
            self.failed = f"PostgreSQL: {err}"
            raise ReceiverError(self.failed) from err

    @property
    def pid(self) -> int:
        """The postmaster's: its backends are its children."""
        assert self.server is not None
        return self.server.pid

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class SharedS3:
    """The one S3 server of the run (versitygw, tests/s3.py), started on first use; a
    bucket per run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server: S3Server | None = None
        self.created = 0

    def bucket(self) -> tuple[S3Server, str]:
        try:
            if self.server is None:
                self.workdir.mkdir(exist_ok=True)
                self.server = S3Server(self.workdir)
                self.server.start()
            self.created += 1
            name = f"ingest-{self.created}"
            self.server.create_bucket(name)
        except (RuntimeError, OSError) as err:  # S3Missing is a RuntimeError
            raise ReceiverError(f"S3: {err}") from err
        return self.server, name

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Settings:
    base: Path
    receiver_tcp_nodelay: str
    telerad: Path
    postgres: SharedPostgres
    index_connections: int
    shim: Path | None = None
    s3: SharedS3 | None = None


class Receiver(abc.ABC):
    """One receiver process on fresh storage; subclasses say how to start and count."""

    name = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.called_ae = ""
        self.workdir = Path()
        self.ready_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.workdir / "receiver.log"

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        started = time.perf_counter()
        self.launch()
        self.wait_until(lambda: echo_ok(self.port, self.called_ae), "C-ECHO")
        self.ready_s = time.perf_counter() - started

    @abc.abstractmethod
    def launch(self) -> None: ...

    @abc.abstractmethod
    def received(self) -> int: ...

    @abc.abstractmethod
    def describe(self) -> str: ...

    def helper_pids(self) -> list[int]:
        """Processes outside the receiver's tree whose CPU is its work (its database)."""
        return []

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            try:
                self.proc = subprocess.Popen(
                    list(argv),
                    cwd=self.workdir,
                    env=env or receiver_env(self.settings.receiver_tcp_nodelay),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as err:
                raise ReceiverError(f"{self.name}: cannot run {argv[0]}: {err}") from err

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status = self.exited()
            if status is not None:
                raise ReceiverError(
                    f"{self.name} exited with status {status} before "
                    f"{what} answered; its log ends:\n    {log_tail(self.log)}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise ReceiverError(
            f"{self.name}: no {what} answer within {START_TIMEOUT_S:.0f} s; "
            f"its log ends:\n    {log_tail(self.log)}"
        )

    def exited(self) -> int | None:
        """Exit status of the receiver's main process, left unreaped so that its process
        group id stays reserved for stop()."""
        if self.proc is None:
            return None
        info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return None if info is None else info.si_status

    def stop(self) -> None:
        """SIGTERM to the receiver's process group, SIGKILL to whatever is left of it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        signal_group(proc.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                break
            time.sleep(0.05)
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


class StoreScp(Receiver):
    """dcmtk storescp; fsync_mode is "none", "preload" (LD_PRELOAD shim) or "exec"."""

    def __init__(self, settings: Settings, name: str, fsync_mode: str) -> None:
        super().__init__(settings)
        self.name = name
        self.fsync_mode = fsync_mode
        self.called_ae = "STORESCP"

    def argv(self) -> list[str]:
        argv = ["storescp", "--fork", "+B", "-dhl", "--max-pdu", str(MAX_PDU)]
        argv += ["-aet", self.called_ae, "-od", "rx"]
        if self.fsync_mode == "exec":
            argv += ["--exec-on-reception", "sync -d #p/#f", "--exec-sync"]
        return [*argv, str(self.port)]

    def launch(self) -> None:
        (self.workdir / "rx").mkdir()
        env = receiver_env(self.settings.receiver_tcp_nodelay)
        if self.fsync_mode == "preload":
            if self.settings.shim is None:
                raise ReceiverError(f"{self.name}: needs a C compiler (cc) for its fsync shim")
            env["LD_PRELOAD"] = str(self.settings.shim)
        self.spawn(self.argv(), env)

    def received(self) -> int:
        return sum(1 for _ in (self.workdir / "rx").iterdir())

    def describe(self) -> str:
        argv = shlex.join(self.argv()).replace(str(self.port), "PORT")
        extra = {
            "none": "no fsync",
            "preload": "LD_PRELOAD=fsync shim: fsync(fd) before each written file is "
            "closed, i.e. before the C-STORE response",
            "exec": "sh -c 'sync -d FILE' (fdatasync) per file, synchronously, after the "
            "C-STORE response and before the next request is read",
        }[self.fsync_mode]
        return f"`{argv}` ({extra})"


class Orthanc(Receiver):
    name = "orthanc"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.called_ae = "ORTHANC"
        self.http_port = 0

    def config(self) -> dict[str, object]:
        return self.base_config()

    def base_config(self) -> dict[str, object]:
        return {
            "Name": "ingest-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.called_ae,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "MaximumPduLength": MAX_PDU,
        }

    def launch(self) -> None:
        self.http_port = free_port()
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        self.spawn(["/usr/sbin/Orthanc", str(path)])
        self.wait_until(lambda: http_get(self.url("/system"))[0] == 200, "GET /system")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def received(self) -> int:
        status, body = http_get(self.url("/statistics"), timeout=10)
        if status != 200:
            raise ReceiverError(f"orthanc: GET /statistics answered {status}")
        return int(json.loads(body)["CountInstances"])

    def shown_config(self) -> dict[str, object]:
        shown = {
            k: v
            for k, v in self.config().items()
            if k not in ("StorageDirectory", "IndexDirectory")
        }
        shown["HttpPort"] = shown["DicomPort"] = "PORT"
        return shown

    def describe(self) -> str:
        return (
            f"`/usr/sbin/Orthanc orthanc.json`, fresh storage and index dirs, "
            f"{json.dumps(self.shown_config())}; fsync per stored file (SyncStorageArea), "
            "SQLite index with Orthanc's built-in JOURNAL_MODE=WAL, SYNCHRONOUS=NORMAL (no "
            "fsync per commit)"
        )


class OrthancPostgres(Orthanc):
    name = "orthanc-postgresql"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.db: DatabaseInfo | None = None

    def launch(self) -> None:
        self.db = self.settings.postgres.database("orthanc")
        super().launch()

    def config(self) -> dict[str, object]:
        return {
            **self.base_config(),
            "Plugins": [str(POSTGRES_INDEX_PLUGIN)],
            "PostgreSQL": self.plugin_config(),
        }

    def plugin_config(self) -> dict[str, object]:
        """The plugin's options as /etc/orthanc/postgresql.json documents them (4.0)."""
        assert self.db is not None
        return {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": "127.0.0.1",
            "Port": self.settings.postgres.port,
            "Database": self.db.name,
            "Username": self.db.role,
            "Password": self.db.password,
            # One Orthanc per database here: no other to lock out.
            "Lock": False,
            "EnableSsl": False,
            # The default, 1, runs one index transaction at a time: as many as the bench
            # opens associations at once.
            "IndexConnectionsCount": self.settings.index_connections,
        }

    def shown_config(self) -> dict[str, object]:
        hidden = {"Port": "PORT", "Database": "DB", "Username": "DB", "Password": "PASSWORD"}
        return {**super().shown_config(), "PostgreSQL": {**self.plugin_config(), **hidden}}

    def helper_pids(self) -> list[int]:
        return [self.settings.postgres.pid]

    def describe(self) -> str:
        return (
            f"`/usr/sbin/Orthanc orthanc.json`, fresh storage dir and a fresh database, "
            f"{json.dumps(self.shown_config())}; fsync per stored file (SyncStorageArea), "
            "the index in PostgreSQL (the plugin's transactions, committed with the "
            "server's defaults: fsync=on, synchronous_commit=on)"
        )


class Telerad(Receiver):
    name = "telerad"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.http_port = 0
        self.data = Path()
        self.config_text = ""

    def example_config(self) -> str:
        argv = [str(self.settings.telerad), "gateway", "--example-config", "--port"]
        argv += [str(self.port), "--http-port", str(self.http_port), "--data-dir", str(self.data)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ReceiverError(f"telerad: `{shlex.join(argv)}` failed: {err}") from err
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ReceiverError(
                f"telerad: `telerad gateway --example-config` exited with status "
                f"{done.returncode}: {why[-1] if why else '(no output)'}"
            )
        return done.stdout

    def launch(self) -> None:
        self.http_port = free_port()
        self.data = self.workdir / "data"
        self.data.mkdir()
        self.config_text = self.example_config()
        loaded = yaml.safe_load(self.config_text)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("aeTitle"), str):
            raise ReceiverError("telerad: the example config has no top-level `aeTitle:`")
        self.called_ae = loaded["aeTitle"]
        config = self.workdir / "gateway.yaml"
        config.write_text(self.configured(loaded))
        self.spawn([str(self.settings.telerad), "gateway", "--config", str(config)])
        self.wait_until(lambda: http_get(self.url("/healthz"))[0] == 200, "GET /healthz")

    def configured(self, loaded: dict[str, object]) -> str:
        """The configuration the gateway runs: the example's, as printed."""
        return self.config_text

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def metric_count(self) -> int | None:
        status, body = http_get(self.url("/metrics"), timeout=10)
        if status != 200:
            return None
        total, seen = 0.0, False
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("telerad_gateway_instances_received_total"):
                total += float(line.rsplit(maxsplit=1)[-1])
                seen = True
        return int(total) if seen else None

    def received(self) -> int:
        files = sum(1 for _ in self.data.rglob("*.dcm"))
        metric = self.metric_count()
        return files if files or metric is None else metric

    def describe(self) -> str:
        return (
            "`telerad gateway --config gateway.yaml`, gateway.yaml = the output of "
            "`telerad gateway --example-config --port PORT --http-port PORT --data-dir DIR`; "
            "count = `*.dcm` under DIR (else `telerad_gateway_instances_received_total`)"
        )


class TeleradPlain(Telerad):
    """The example's configuration without encryption at rest: what sealing costs."""

    name = "telerad-plain"

    def configured(self, loaded: dict[str, object]) -> str:
        storage = loaded["storage"]
        assert isinstance(storage, dict)
        storage.pop("encryption")
        return yaml.safe_dump(loaded, sort_keys=False)

    def describe(self) -> str:
        return "as telerad, without `storage.encryption` in gateway.yaml (files as received)"


class TeleradS3(Telerad):
    """The example's configuration (encrypted) with the hot tier in a bucket."""

    name = "telerad-s3"

    def configured(self, loaded: dict[str, object]) -> str:
        if self.settings.s3 is None:
            raise ReceiverError("telerad-s3: the run has no S3 server")
        server, bucket = self.settings.s3.bucket()
        credentials = self.workdir / "s3-credentials"
        credentials.write_text(
            f"AWS_ACCESS_KEY_ID={server.access_key}\nAWS_SECRET_ACCESS_KEY={server.secret_key}\n"
        )
        storage = loaded["storage"]
        assert isinstance(storage, dict)
        storage["hotStore"] = {
            "url": f"s3://{bucket}/site",
            "endpoint": server.endpoint,
            "region": server.region,
            "credentialsFile": str(credentials),
        }
        return yaml.safe_dump(loaded, sort_keys=False)

    def helper_pids(self) -> list[int]:
        assert self.settings.s3 is not None
        assert self.settings.s3.server is not None
        return [self.settings.s3.server.pid]

    def describe(self) -> str:
        return (
            "as telerad (encrypted), with `storage.hotStore: {url: s3://BUCKET/site, "
            "endpoint, region, credentialsFile}` in gateway.yaml: a fresh bucket per run on "
            "one versitygw v1.8.0 server (POSIX backend, which does not fsync); receiver "
            "CPU includes the S3 server's"
        )


class TeleradPostgres(Telerad):
    name = "telerad-postgresql"

    def configured(self, loaded: dict[str, object]) -> str:
        db = self.settings.postgres.database("telerad")
        loaded["catalog"] = {"url": db.url, "passwordFile": str(db.password_file)}
        return yaml.safe_dump(loaded, sort_keys=False)

    def helper_pids(self) -> list[int]:
        return [self.settings.postgres.pid]

    def describe(self) -> str:
        return (
            "as telerad, with `catalog: {url: postgresql://DB@127.0.0.1:PORT/DB, "
            "passwordFile: FILE}` in gateway.yaml, a fresh database per run (the catalog's "
            "transactions committed with the server's defaults: fsync=on, "
            "synchronous_commit=on)"
        )


def make_receiver(name: str, settings: Settings) -> Receiver:
    fsync_modes = {"storescp": "none", "storescp-fsync": "preload", "storescp-execsync": "exec"}
    if name in fsync_modes:
        return StoreScp(settings, name, fsync_modes[name])
    others: dict[str, type[Receiver]] = {
        "orthanc": Orthanc,
        "orthanc-postgresql": OrthancPostgres,
        "telerad": Telerad,
        "telerad-plain": TeleradPlain,
        "telerad-s3": TeleradS3,
        "telerad-postgresql": TeleradPostgres,
    }
    return others[name](settings)


def build_shim(base: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = base / "fsync_shim.c", base / "fsync_shim.so"
    source.write_text(FSYNC_SHIM_C)
    argv = [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return library if done.returncode == 0 else None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Workload:
    label: str
    root: Path
    files: tuple[str, ...]
    nbytes: int
    associations: int
    nodelay: bool


def synthetic_files(data_dir: Path, kind: str, count: int) -> tuple[Path, list[str]]:
    """Files of one data set, written by telerad.synthetic once and reused from data_dir."""
    target = data_dir / f"{kind}-{count}"
    marker = target / ".complete"
    if marker.exists():
        return target, marker.read_text().split()
    try:
        synthetic = importlib.import_module("telerad.synthetic")
    except ImportError as err:
        raise SystemExit(f"telerad.synthetic is not importable ({err}); cannot make data") from err
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    print(f"generating {count} {kind} instances into {target} ...", file=sys.stderr)
    if kind == "ct":
        datasets = synthetic.ct_series(n_slices=count, size=512, seed=0)
    else:
        datasets = synthetic.small_instances(n=count, seed=0)
    written = synthetic.write_series(datasets, target)
    names = [str(Path(p).resolve().relative_to(target.resolve())) for p in written]
    marker.write_text("\n".join(names) + "\n")
    return target, names


def workloads_of(
    label: str, root: Path, names: Sequence[str], *, assocs: Iterable[int], nodelay: bool
) -> list[Workload]:
    nbytes = sum((root / n).stat().st_size for n in names)
    return [Workload(label, root, tuple(names), nbytes, a, nodelay) for a in assocs]


def make_workloads(args: argparse.Namespace, data_dir: Path) -> list[Workload]:
    wanted = args.workloads.split(",")
    out: list[Workload] = []
    if "ct" in wanted:
        root, names = synthetic_files(data_dir, "ct", args.ct_slices)
        label = f"CT {len(names)} x 512x512x16"
        out += workloads_of(label, root, names, assocs=args.associations, nodelay=True)
    if "small" in wanted or "nagle" in wanted:
        root, names = synthetic_files(data_dir, "small", args.small_count)
        if "small" in wanted:
            label = f"{len(names)} small"
            out += workloads_of(label, root, names, assocs=args.associations, nodelay=True)
        if "nagle" in wanted:
            few = names[: args.nagle_count]
            label = f"{len(few)} small, sender Nagle on"
            out += workloads_of(label, root, few, assocs=[1], nodelay=False)
    return out


def warm_page_cache(workloads: Iterable[Workload]) -> None:
    """Read every file once so that no run pays for reading the sender's files from disk."""
    for path in {wl.root / name for wl in workloads for name in wl.files}:
        path.read_bytes()


def split(files: Sequence[str], groups: int) -> list[list[str]]:
    size, extra = divmod(len(files), groups)
    out, at = [], 0
    for i in range(groups):
        n = size + (1 if i < extra else 0)
        out.append(list(files[at : at + n]))
        at += n
    return [g for g in out if g]


# --------------------------------------------------------------------------- one run


@dataclass
class SendOutcome:
    wall_s: float
    cpu_s: float
    failures: list[str] = field(default_factory=list)


def send(wl: Workload, port: int, called_ae: str, logdir: Path) -> SendOutcome:
    """Run the storescu processes at once; wall from first start to last exit."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if wl.nodelay:
        env["TCP_NODELAY"] = "1"
    head = ["storescu", "-aec", called_ae, "-aet", SENDER_AET, "--max-pdu", str(MAX_PDU)]
    head += ["127.0.0.1", str(port)]
    groups = split(wl.files, wl.associations)
    exits: list[tuple[float, int, float]] = [(0.0, -1, 0.0)] * len(groups)
    procs: list[subprocess.Popen[bytes]] = []

    def reap(i: int, proc: subprocess.Popen[bytes]) -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        exits[i] = (time.perf_counter(), proc.returncode, usage.ru_utime + usage.ru_stime)

    start = time.perf_counter()
    for i, group in enumerate(groups):
        with (logdir / f"storescu-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen([*head, *group], cwd=wl.root, env=env, stdout=log, stderr=log)
            )
    threads = [threading.Thread(target=reap, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, SEND_TIMEOUT_S - (time.perf_counter() - start)))
        if t.is_alive():
            for p in procs:
                if p.returncode is None:
                    p.kill()
            t.join()
    outcome = SendOutcome(max(e[0] for e in exits) - start, sum(e[2] for e in exits))
    for i, (_, code, _) in enumerate(exits):
        if code != 0:
            tail = log_tail(logdir / f"storescu-{i}.log", 4)
            outcome.failures.append(f"storescu #{i} exit {code}: {tail}")
    return outcome


def wait_for_count(rx: Receiver, expected: int) -> int:
    deadline = time.monotonic() + COUNT_TIMEOUT_S
    count = rx.received()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = rx.received()
    return count


@dataclass
class RunResult:
    workload: str
    associations: int
    receiver: str
    instances: int
    nbytes: int
    wall_s: float = 0.0
    receiver_cpu_s: float = 0.0
    sender_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    received: int = 0
    started: bool = False
    ready_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.received == self.instances


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def receiver_cpu_seconds(rx: Receiver) -> float:
    return sum(tree_cpu_seconds(pid) for pid in [rx.pid, *rx.helper_pids()])


def measure(rx: Receiver, wl: Workload, result: RunResult) -> None:
    cpu0, busy0 = receiver_cpu_seconds(rx), machine_busy_seconds()
    outcome = send(wl, rx.port, rx.called_ae, rx.workdir)
    result.wall_s, result.sender_cpu_s = outcome.wall_s, outcome.cpu_s
    result.errors += outcome.failures
    try:
        result.received = wait_for_count(rx, len(wl.files))
    except ReceiverError as err:
        result.errors.append(str(err))
    time.sleep(SETTLE_S)
    result.receiver_cpu_s = receiver_cpu_seconds(rx) - cpu0
    busy = machine_busy_seconds() - busy0
    result.other_cpu_s = max(0.0, busy - result.receiver_cpu_s - result.sender_cpu_s)
    status = rx.exited()
    if status is not None:
        result.errors.append(f"{rx.name} exited with status {status} during the run")


def run_one(rx: Receiver, wl: Workload, base: Path) -> RunResult:
    """Fresh receiver on empty storage, one send, count, stop."""
    result = RunResult(wl.label, wl.associations, rx.name, len(wl.files), wl.nbytes)
    workdir = Path(tempfile.mkdtemp(prefix=f"{rx.name}-", dir=base))
    try:
        rx.start(workdir)
        result.started, result.ready_s = True, rx.ready_s
        measure(rx, wl, result)
    except ReceiverError as err:
        result.errors.append(str(err))
    finally:
        rx.stop()
        # The received files stay until the end (see KEEP_NOTE); sync so that no dirty
        # pages of this run are written back during the next one.
        os.sync()
    return result


def progress(res: RunResult, rep: int, repeats: int) -> None:
    rate = res.instances / res.wall_s if res.wall_s else 0.0
    status = "ok" if res.ok else f"FAILED ({res.received}/{res.instances} received)"
    print(
        f"[{rep + 1}/{repeats}] {res.workload} x{res.associations} {res.receiver}: "
        f"{rate:.0f} inst/s, {res.wall_s:.2f} s, receiver CPU {res.receiver_cpu_s:.2f} s, "
        f"others' CPU {res.other_cpu_s:.2f} s, {status}",
        file=sys.stderr,
    )
    for err in res.errors:
        print(f"    {err}", file=sys.stderr)


def run_all(
    receivers: list[Receiver], workloads: list[Workload], repeats: int, base: Path
) -> tuple[list[RunResult], dict[str, str]]:
    """Receivers interleaved inside each repeat.

    A receiver that fails to start before it ever started is dropped with its reason; one
    that fails later gets a failed run and stays in.
    """
    results: list[RunResult] = []
    unavailable: dict[str, str] = {}
    started: set[str] = set()
    for rep in range(repeats):
        for wl in workloads:
            for rx in receivers:
                if rx.name in unavailable:
                    continue
                res = run_one(rx, wl, base)
                if not res.started and rx.name not in started:
                    unavailable[rx.name] = "; ".join(res.errors)
                    why = "\n    ".join(res.errors)
                    print(f"receiver {rx.name} unavailable, skipped: {why}", file=sys.stderr)
                    continue
                started.add(rx.name)
                results.append(res)
                progress(res, rep, repeats)
    return results, unavailable


# --------------------------------------------------------------------------- report


def first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"({err})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "(no output)"


def machine_info(base: Path) -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    fs = max(
        (m for m in mounts if str(base.resolve()).startswith(m[1])),
        key=lambda m: len(m[1]),
        default=["?", "?", "?"],
    )
    return [
        f"nproc {len(os.sched_getaffinity(0))}, {cpu}, {mem_kib / 2**20:.0f} GiB RAM",
        f"kernel {platform.release()} ({platform.machine()}), Python {platform.python_version()}",
        f"receiver storage under {base} on {fs[2]} ({fs[0]} mounted at {fs[1]})",
    ]


def versions(telerad: Path, receivers: list[str]) -> list[str]:
    out = [
        f"dcmtk: {first_line(['storescu', '--version'])}; {first_line(['storescp', '--version'])}"
    ]
    if any(r.startswith("orthanc") for r in receivers):
        out.append(f"Orthanc: {first_line(['/usr/sbin/Orthanc', '--version'])}")
    if "orthanc-postgresql" in receivers:
        package = ["dpkg-query", "-W", "-f", "${Package} ${Version}", "orthanc-postgresql"]
        out.append(f"Orthanc index plugin: {POSTGRES_INDEX_PLUGIN} ({first_line(package)})")
    if any(r.endswith("-postgresql") for r in receivers):
        postgres = first_line([str(POSTGRES_BIN / "postgres"), "--version"])
        out.append(f"PostgreSQL: {postgres}, one server for both, a database per run")
    if any(r.startswith("telerad") for r in receivers):
        rev = first_line(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"])
        out.append(f"telerad: {telerad} (working tree at commit {rev[:12]})")
    return out


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def summarize(runs: list[RunResult]) -> dict[str, float]:
    good = [r for r in runs if r.ok] or runs
    rates = [r.instances / r.wall_s for r in good if r.wall_s > 0] or [0.0]
    median_rate = statistics.median(rates)
    return {
        "rate": median_rate,
        "mbs": median_rate * good[0].nbytes / good[0].instances / 1e6,
        "best": max(rates),
        "wall": statistics.median(r.wall_s for r in good),
        "cpu": statistics.median(r.receiver_cpu_s for r in good),
        "sender_cpu": statistics.median(r.sender_cpu_s for r in good),
        "other_cpu": statistics.median(r.other_cpu_s for r in good),
        "ok": sum(r.ok for r in runs),
        "runs": len(runs),
    }


def row(workload: str, assocs: int, rx: str, sums: dict[str, dict[str, float]]) -> str:
    s = sums[rx]
    cells = [workload, str(assocs), rx, fmt(s["rate"]), fmt(s["best"]), fmt(s["mbs"], 1)]
    cells += [fmt(s[k], 2) for k in ("wall", "cpu", "sender_cpu", "other_cpu")]
    for base in (BASELINE, FSYNC_BASELINE):
        if base in sums:
            rate = sums[base]["rate"]
            cells.append(f"{s['rate'] / rate:.2f}" if rate else "-")
    cells.append(f"{s['ok']:.0f}/{s['runs']:.0f}")
    return "| " + " | ".join(cells) + " |"


def group(results: list[RunResult]) -> dict[tuple[str, int], dict[str, list[RunResult]]]:
    """(workload, associations) -> receiver -> its runs, in the order they ran."""
    groups: dict[tuple[str, int], dict[str, list[RunResult]]] = {}
    for r in results:
        groups.setdefault((r.workload, r.associations), {}).setdefault(r.receiver, []).append(r)
    return groups


def table(results: list[RunResult], receivers: list[str]) -> list[str]:
    groups = group(results)
    measured = {r.receiver for r in results}
    bases = [f"x {b}" for b in (BASELINE, FSYNC_BASELINE) if b in measured]
    head = ["workload", "assoc", "receiver", "inst/s", "best inst/s", "MB/s", "wall s"]
    head += ["receiver CPU s", "sender CPU s", "others' CPU s", *bases, "ok runs"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    for (workload, assocs), by_rx in groups.items():
        sums = {name: summarize(runs) for name, runs in by_rx.items()}
        lines += [row(workload, assocs, rx, sums) for rx in receivers if rx in sums]
    return lines


def goal_lines(results: list[RunResult]) -> list[str]:
    """A table of each goal's ratio per workload, for the pairs this run measured."""
    rates: dict[tuple[str, int], dict[str, float]] = {}
    for (workload, assocs), by_rx in group(results).items():
        rates[workload, assocs] = {name: summarize(runs)["rate"] for name, runs in by_rx.items()}
    measured = {r.receiver for r in results}
    goals = [g for g in GOALS if {g[0], g[1]} <= measured]
    if not goals:
        return []
    head = ["workload", "assoc", *(f"{rx} / {peer} (goal >= {least})" for rx, peer, least in goals)]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(goals)]
    for (workload, assocs), rate in rates.items():
        cells = [workload, str(assocs)]
        for rx, peer, least in goals:
            if rate.get(rx) and rate.get(peer):
                ratio = rate[rx] / rate[peer]
                cells.append(f"{ratio:.2f} {'met' if ratio >= least else 'NOT met'}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(
    args: argparse.Namespace,
    results: list[RunResult],
    receivers: list[Receiver],
    unavailable: dict[str, str],
    base: Path,
) -> None:
    names = [rx.name for rx in receivers]
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"`{command}`, {datetime.date.today().isoformat()}, {args.repeats} repeat(s), medians.")
    print()
    for line in [*machine_info(base), *versions(args.telerad, names)]:
        print(f"- {line}")
    print()
    print("\n".join(table(results, [n for n in names if n not in unavailable])))
    print()
    goals = goal_lines(results)
    if goals:
        print("Goals (issues 17 and 18), ratio of median inst/s:")
        print()
        print("\n".join(goals))
        print()
    print("Notes:")
    for name, why in unavailable.items():
        print(f"- {name}: not measured, it did not start: {why.splitlines()[0]}")
    for line in notes(args, receivers, results, unavailable):
        print(f"- {line}")


def notes(
    args: argparse.Namespace,
    receivers: list[Receiver],
    results: list[RunResult],
    unavailable: dict[str, str],
) -> list[str]:
    out = [
        "sender: `TCP_NODELAY=1 storescu -aec <calledAE> -aet STORESCU --max-pdu 131072 "
        "127.0.0.1 <port> <files>`; with 4 associations the files are split into 4 "
        "contiguous groups, one storescu process each, all started at once; the Nagle row "
        "runs storescu without TCP_NODELAY in its environment (this dcmtk build then "
        "leaves Nagle on)",
        "wall = first storescu start to last storescu exit (includes storescu reading its "
        "files and negotiating); inst/s and MB/s (10^6 bytes of files sent) from the median "
        "run, best = the fastest repeat; x storescp* = ratio of median inst/s",
        "receiver CPU = user+sys of the receiver process and its descendants (/proc, "
        "reaped children included) from ready to count verified + "
        f"{SETTLE_S} s; sender CPU = user+sys of the storescu processes (wait4); others' CPU "
        "= busy CPU of the whole machine (/proc/stat) in the same window minus both: "
        "kernel threads (writeback, ksoftirqd) and anything else running on the machine, "
        "i.e. how disturbed the run was",
        "each run: receiver started fresh on empty storage in a new directory, ready when "
        "C-ECHO (and its HTTP check) answers; after the run it is stopped and `sync` run, "
        "outside the timing; receivers run in turn within each repeat; sender and receiver "
        "share the machine's cores",
        KEEP_NOTE,
        f"receivers' environment: TCP_NODELAY={args.receiver_tcp_nodelay} (dcmtk's own "
        "switch; storescp and Orthanc link dcmtk, whose default leaves Nagle on and stalls "
        "every C-STORE response on a 40 ms delayed ACK)",
    ]
    if any(r.receiver.endswith("-postgresql") for r in results):
        out.append(
            "the -postgresql rows' receiver CPU includes the PostgreSQL server's (the "
            "postmaster's process tree, its backends included) over the same window: the "
            "database does that receiver's work, and no other receiver runs meanwhile"
        )
    for rx in receivers:
        if rx.name not in unavailable:
            out.append(f"{rx.name}: {rx.describe()}")
    ready: dict[str, list[float]] = {}
    for r in results:
        ready.setdefault(r.receiver, []).append(r.ready_s)
    out.append(
        "median start-to-ready s: "
        + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in ready.items())
    )
    failed = [r for r in results if not r.ok]
    for r in failed:
        out.append(
            f"FAILED run: {r.workload} x{r.associations} {r.receiver}: received "
            f"{r.received}/{r.instances}; {'; '.join(e.splitlines()[0] for e in r.errors)}"
        )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--receivers", default=DEFAULT_RECEIVERS, help=", ".join(ALL_RECEIVERS))
    parser.add_argument("--workloads", default="ct,small,nagle", help="ct,small,nagle")
    parser.add_argument("--associations", default="1,4", help="parallel associations")
    parser.add_argument("--repeat", dest="repeats", type=int, default=None, help="default 3")
    parser.add_argument("--quick", action="store_true", help="1 repeat, smaller data sets")
    parser.add_argument("--ct-slices", type=int, default=None, help="default 300 (quick 100)")
    parser.add_argument("--small-count", type=int, default=None, help="default 2000 (quick 500)")
    parser.add_argument("--nagle-count", type=int, default=None, help="default 200 (quick 50)")
    parser.add_argument("--data-dir", type=Path, help="keep generated data here and reuse it")
    parser.add_argument("--tmp-dir", type=Path, help="receivers' storage (default: $TMPDIR)")
    parser.add_argument("--receiver-tcp-nodelay", choices=["1", "0", "unset"], default="1")
    parser.add_argument("--telerad", type=Path, default=Path(sys.executable).parent / "telerad")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.ct_slices = args.ct_slices or (100 if quick else 300)
    args.small_count = args.small_count or (500 if quick else 2000)
    args.nagle_count = min(args.nagle_count or (50 if quick else 200), args.small_count)
    args.associations = [int(a) for a in args.associations.split(",")]
    unknown = set(args.receivers.split(",")) - set(ALL_RECEIVERS)
    if unknown:
        parser.error(f"unknown receivers {sorted(unknown)}; choose from {', '.join(ALL_RECEIVERS)}")
    return args


def check_space(base: Path, workloads: list[Workload], repeats: int, receivers: int) -> None:
    """Every run's files are kept until the end, so they must all fit."""
    need = sum(wl.nbytes for wl in workloads) * repeats * receivers * 1.2 + 2**28
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(
            f"{base}: {free / 2**30:.1f} GiB free, the runs keep ~{need / 2**30:.1f} GiB of "
            "received files until the end; use --tmp-dir elsewhere or fewer repeats/receivers"
        )


def check_tools(names: list[str]) -> None:
    needed = ["storescu", "echoscu"] + (["storescp"] if any("storescp" in n for n in names) else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if any(n.startswith("orthanc") for n in names) and not Path("/usr/sbin/Orthanc").exists():
        missing.append("/usr/sbin/Orthanc")
    if "orthanc-postgresql" in names and not POSTGRES_INDEX_PLUGIN.exists():
        missing.append(f"{POSTGRES_INDEX_PLUGIN} (Debian's orthanc-postgresql)")
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = [n for n in ALL_RECEIVERS if n in args.receivers.split(",")]
    check_tools(names)
    with tempfile.TemporaryDirectory(prefix="telerad-ingest-", dir=args.tmp_dir) as tmp:
        base = Path(tmp)
        data_dir = args.data_dir or base / "data"
        workloads = make_workloads(args, data_dir)
        check_space(base, workloads, args.repeats, len(names))
        warm_page_cache(workloads)
        postgres = SharedPostgres(base / "postgres")
        s3 = SharedS3(base / "s3")
        settings = Settings(
            base,
            args.receiver_tcp_nodelay,
            args.telerad,
            postgres,
            index_connections=max(args.associations),
            shim=build_shim(base),
            s3=s3,
        )
        receivers = [make_receiver(n, settings) for n in names]
        try:
            results, unavailable = run_all(receivers, workloads, args.repeats, base)
        finally:
            postgres.close()
            s3.close()
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
        report(args, results, receivers, unavailable, base)


if __name__ == "__main__":
    main()
