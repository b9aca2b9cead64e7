"""The throwaway PostgreSQL of tests/postgres.py does what the catalog's tests rely on:
password logins over TCP, databases closed to each other's roles, data kept across a stop
and a crash, and no server left behind by pytest."""

from __future__ import annotations

import signal
import time
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.postgres import PostgresServer
from tests.processes import alive, signal_inner_pytest


def test_a_database_takes_its_password_over_tcp_and_refuses_a_wrong_one(
    postgres: PostgresServer,
) -> None:
    db = postgres.create_database("login")
    assert urlsplit(db.url).password is None
    assert db.password_file.read_text() == db.password
    assert db.password_file.stat().st_mode & 0o777 == 0o600

    with psycopg.connect(db.url, password=db.password, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), inet_server_addr(), rolsuper"
            " FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == ("login", "login", IPv4Address("127.0.0.1"), False)

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(db.url, password=db.password + "x", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(db.url, password="", connect_timeout=5)


def test_two_databases_are_isolated(postgres: PostgresServer) -> None:
    a = postgres.create_database("tenant_a")
    b = postgres.create_database("tenant_b")
    with psycopg.connect(a.url, password=a.password, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE studies (uid text PRIMARY KEY)")
        conn.execute("INSERT INTO studies VALUES ('1.2.3')")

    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(a.url, user=b.role, password=b.password, connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(b.url, password=a.password, connect_timeout=5)
    with psycopg.connect(b.url, password=b.password, connect_timeout=5) as conn:
        assert conn.execute("SELECT to_regclass('studies')").fetchone() == (None,)


def test_stop_fails_connections_and_start_brings_the_data_back(postgres: PostgresServer) -> None:
    db = postgres.create_database("outage")
    with psycopg.connect(db.url, password=db.password, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE studies (uid text PRIMARY KEY)")
        conn.execute("INSERT INTO studies VALUES ('1.2.3')")
    held = psycopg.connect(db.url, password=db.password, connect_timeout=5, autocommit=True)
    try:
        postgres.stop()
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="refused"):
            psycopg.connect(db.url, password=db.password, connect_timeout=5)
    finally:
        held.close()
        postgres.start()

    with psycopg.connect(db.url, password=db.password, connect_timeout=5) as conn:
        assert conn.execute("SELECT uid FROM studies").fetchall() == [("1.2.3",)]


def test_a_commit_survives_a_crash(postgres: PostgresServer) -> None:
    db = postgres.create_database("crash")
    # Not a `with` block: leaving one commits, and there is no server left to commit to.
    conn = psycopg.connect(db.url, password=db.password, connect_timeout=5)
    try:
        conn.execute("CREATE TABLE studies (uid text PRIMARY KEY)")
        conn.execute("INSERT INTO studies VALUES ('1.2.3')")
        conn.commit()
        conn.execute("INSERT INTO studies VALUES ('never-committed')")
        pid = postgres.pid
        postgres.kill()
    finally:
        conn.close()
    assert not alive(pid)
    postgres.start()

    with psycopg.connect(db.url, password=db.password, connect_timeout=5) as conn:
        assert conn.execute("SELECT uid FROM studies").fetchall() == [("1.2.3",)]
    assert "database system was interrupted" in postgres.log.read_text()


HOLDER = """
import os
import time
from pathlib import Path

from tests.conftest import postgres  # noqa: F401


def test_hold(postgres):
    held = Path(os.environ["HELD"])
    held.with_suffix(".tmp").write_text(f"{postgres.pid} {postgres.data_dir}")
    held.with_suffix(".tmp").replace(held)  # whole when it appears
    time.sleep(600)
"""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_the_server_does_not_outlive_pytest(tmp_path: Path, how: signal.Signals) -> None:
    pid_text, data_dir = signal_inner_pytest(tmp_path, HOLDER, how).split(" ", 1)
    pid = int(pid_text)

    deadline = time.monotonic() + 30
    while alive(pid) or Path(data_dir).exists():
        assert time.monotonic() < deadline, f"postmaster {pid} or {data_dir} outlived pytest"
        time.sleep(0.05)
