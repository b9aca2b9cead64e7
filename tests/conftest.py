"""Suite-wide: the `reliability` marker's report, and the `postgres` and `s3` fixtures.

A test marked `@pytest.mark.reliability("fault" | "attack" | "load" | "fuzz", "what was
tried")` is a row of RELIABILITY.md. Every such test asserts that nothing acknowledged was
lost (or nothing refused got in). With TELERAD_RELIABILITY_REPORT=FILE set, each run's
outcome is appended to FILE as one JSON line; bench/reliability.py runs them and writes
the table.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from telerad.api.config import CatalogConfig
from tests.postgres import PostgresServer
from tests.s3 import S3Server
from tests.s3proxy import S3Proxy


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    target = os.environ.get("TELERAD_RELIABILITY_REPORT")
    # One line per marker of a test (a test may prove more than one row): its call, or
    # its setup when that failed (the call never ran).
    last = report.when == "call" or (report.when == "setup" and not report.passed)
    for marker in item.iter_markers("reliability") if target and last else ():
        kind, tried = marker.args
        line = {
            "test": item.nodeid,
            "kind": kind,
            "tried": tried,
            "outcome": report.outcome,
            "cases": _cases(item),
            "seconds": round(call.duration, 1),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with Path(target).open("a") as out:
            out.write(json.dumps(line) + "\n")
    return report


def _cases(item: pytest.Item) -> int:
    """The cases one run tried: the examples a fuzz test recorded (`fuzz_examples`), or
    those Hypothesis passed in every phase (from the statistics its pytest plugin keeps on
    the item), else one."""
    recorded = dict(getattr(item, "user_properties", [])).get("fuzz_examples")
    if isinstance(recorded, int):
        return recorded
    stats = getattr(item, "hypothesis_statistics", "")
    return sum(int(n) for n in re.findall(r"(\d+) passing", stats)) or 1


Server = TypeVar("Server", PostgresServer, S3Server)


def _served(server: Server) -> Iterator[Server]:
    """A session's server, started, and closed (its process gone) whatever happened."""
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 for the session, started by the first test that asks for it;
    its log is postgres.log in the fixture's tmp dir."""
    yield from _served(PostgresServer(tmp_path_factory.mktemp("postgres")))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (versitygw, POSIX backend) for the session, started by the first
    test that asks for it; its log is versitygw.log in the fixture's tmp dir, its buckets
    are directories under data/ there."""
    yield from _served(S3Server(tmp_path_factory.mktemp("s3")))


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket of the session's S3 server, and what a client needs to reach it."""

    server: S3Server
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def region(self) -> str:
        return self.server.region

    @property
    def credentials(self) -> dict[str, str]:
        """The standard AWS environment variables (as the gateway takes them)."""
        return {
            "AWS_ACCESS_KEY_ID": self.server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
        }

    @property
    def data_dir(self) -> Path:
        """Where the server keeps the bucket's objects: one file per key."""
        return self.server.data_dir / self.name


@pytest.fixture
def s3(s3_server: S3Server) -> S3Bucket:
    """A bucket of its own for each test, on the session's S3 server (started again if a
    test left it stopped)."""
    if not s3_server.running:
        s3_server.start()
    bucket = S3Bucket(s3_server, f"t{secrets.token_hex(6)}")
    s3_server.create_bucket(bucket.name)
    return bucket


@pytest.fixture
def s3_proxy(s3: S3Bucket) -> Iterator[S3Proxy]:
    """A proxy in front of the test's S3 server that records the requests (what the server
    ignores, such as storage classes, shows there) and can lose an answer."""
    proxy = S3Proxy(s3.server.port)
    try:
        yield proxy
    finally:
        proxy.close()


CatalogFactory = Callable[[], CatalogConfig]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_catalog(request: pytest.FixtureRequest) -> CatalogFactory:
    """Each backend in turn: new catalogs on it, each SQLite in its hot tier (the default)
    or a fresh database of its own on the session's PostgreSQL."""
    if request.param == "sqlite":
        return CatalogConfig
    server: PostgresServer = request.getfixturevalue("postgres")

    def database() -> CatalogConfig:
        created = server.create_database(f"t{secrets.token_hex(6)}")
        return CatalogConfig(url=created.url, password_file=created.password_file)

    return database


@pytest.fixture
def catalog_config(new_catalog: CatalogFactory) -> CatalogConfig:
    return new_catalog()
