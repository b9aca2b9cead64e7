"""A throwaway real PostgreSQL 15 cluster for the PostgreSQL catalog's tests and benches.

Debian's server binaries (`make debs` installs postgresql-15) run the cluster on a free
loopback port, as the `postgres` OS user when the tests run as root (initdb and postgres
refuse root). Roles log in over TCP with SCRAM passwords, as the gateway does against a
managed PostgreSQL; only the superuser gets in, without one, over the unix socket.

pg_ctl puts the postmaster in a session of its own, so neither Ctrl-C nor the end of
pytest reaches it: a watchdog process (`python -m tests.postgres DIR`) waits for pytest's
end, whichever way it comes, and kills the cluster and removes its files. The benches in
bench/ start it too (no pytest there): what is missing raises `PostgresMissing`, which
fails a test as any error does and leaves a bench to report the receiver unavailable.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from tests.processes import alive, children

BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parents[1]
SUPERUSER = "postgres"
INSTALL = "`make debs` installs postgresql-15"
# Unquoted in the URL and in SQL alike: lower case, as PostgreSQL folds identifiers.
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

HBA = f"""\
# TYPE  DATABASE  USER        ADDRESS       METHOD
local   all       {SUPERUSER}                trust
host    all       all         127.0.0.1/32  scram-sha-256
"""


@dataclass(frozen=True)
class DatabaseInfo:
    """A database and the login role owning it: what a Secret would name."""

    name: str
    role: str
    url: str  # postgresql://ROLE@127.0.0.1:PORT/DB, no password in it
    password: str
    password_file: Path  # the password alone, mode 0600


class PostgresMissing(RuntimeError):
    """PostgreSQL 15 or its OS user is not installed here."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_cluster(root: Path) -> None:
    """SIGKILL the postmaster of the cluster under `root` and its backends, as a crash of
    the machine would, and wait until they are gone: a backend still attached to the shared
    memory would stop the next start."""
    lock = root / "data" / "postmaster.pid"
    try:
        pid = int(lock.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return
    if not alive(pid):
        return
    # Stopped, the postmaster forks no backend between the listing and the kill.
    os.kill(pid, signal.SIGSTOP)
    victims = [pid, *children(pid)]
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(alive(v) for v in victims):
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL processes {victims} outlived SIGKILL for 30 s")
        time.sleep(0.05)
    # No PID survives a crash of the machine, nor a socket lock its tmpfs. Here the
    # postmaster may linger as a zombie until init reaps it (a second in some sandboxes,
    # never where pytest is PID 1), and the next postmaster would take its lock files for
    # those of a live one.
    lock.unlink()
    for socket_lock in (root / "socket").glob(".s.PGSQL.*.lock"):
        socket_lock.unlink()


class PostgresServer:
    """One cluster: `start()` (initdb the first time), `stop()`, `kill()`, `start()` again
    on the same port and data, `close()` at the end. Logs and password files go to
    `workdir`."""

    def __init__(self, workdir: Path) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not os.access(BIN / tool, os.X_OK):
                raise PostgresMissing(f"{BIN / tool} is missing: {INSTALL}")
        self.workdir = workdir
        self.log = workdir / "postgres.log"
        self.port = free_port()
        self._owner = self._os_user()
        # Not under workdir: pytest's tmp dirs are root's alone (0700), and the cluster's
        # files must belong to the postgres user.
        self._root = Path(tempfile.mkdtemp(prefix="telerad-postgres-"))
        self.data_dir = self._root / "data"
        self.socket_dir = self._root / "socket"
        self.socket_dir.mkdir()
        if self._owner is not None:
            for path in (self._root, self.socket_dir):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "tests.postgres", str(self._root)],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            # Out of pytest's process group: a Ctrl-C must not end it before pytest ends.
            start_new_session=True,
        )
        self.running = False

    @staticmethod
    def _os_user() -> pwd.struct_passwd | None:
        """The user the cluster runs as when the tests run as root, else None (ourselves)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing(f"no `postgres` OS user: {INSTALL}") from None

    @property
    def admin_url(self) -> str:
        """The superuser, over the unix socket (trusted; no password exists)."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{SUPERUSER}@/postgres?host={host}&port={self.port}"

    @property
    def pid(self) -> int:
        """The postmaster's."""
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def _run(self, *argv: str) -> None:
        command = [str(BIN / argv[0]), *argv[1:]]
        if self._owner is not None:
            command = ["runuser", "-u", self._owner.pw_name, "--", *command]
        # The server inherits this descriptor for its log: the postgres user could not
        # open a file under workdir itself.
        with self.log.open("ab") as log:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self._root, check=False
            )
        if done.returncode != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{tail}")

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            # --no-sync: a throwaway cluster need not survive a power cut before its first
            # checkpoint; the server itself runs with fsync on.
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            )
            (self.data_dir / "pg_hba.conf").write_text(HBA)
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
            " -c max_connections=300 -c fsync=on"
        )
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir), "-o", options)
        self.running = True

    def stop(self) -> None:
        """A clean shutdown (`-m fast`: open sessions are ended, not waited for)."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data_dir))
        self.running = False

    def kill(self) -> None:
        """A crash: the next start() runs crash recovery."""
        kill_cluster(self._root)
        self.running = False

    def create_database(self, name: str, owner_password: str | None = None) -> DatabaseInfo:
        """A login role `name` (no superuser) and a database `name` it owns, which no other
        role may connect to."""
        if NAME.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a plain lower-case PostgreSQL identifier")
        password = owner_password or secrets.token_urlsafe(24)
        ident = sql.Identifier(name)
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as admin:
            # Utility statements take no bound parameters: the password goes in as a literal
            # (the server stores its SCRAM verifier; statements are not logged).
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
                    ident, sql.Literal(password)
                )
            )
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, ident))
            # PUBLIC may connect to every database by default: one tenant's role to another's.
            admin.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        password_file = self.workdir / f"{name}.password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password)
        return DatabaseInfo(
            name=name,
            role=name,
            url=f"postgresql://{name}@127.0.0.1:{self.port}/{name}",
            password=password,
            password_file=password_file,
        )

    def close(self) -> None:
        """Stop the server and remove its files (the log stays in workdir)."""
        try:
            if self.running:
                self.stop()
        finally:
            kill_cluster(self._root)
            shutil.rmtree(self._root, ignore_errors=True)
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()
            self._watchdog.wait(30)


def watch(root: Path) -> None:
    """Wait for the end of stdin (pytest closed it or died), then kill the cluster under
    `root` and remove it."""
    sys.stdin.buffer.read()
    kill_cluster(root)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    watch(Path(sys.argv[1]))
