"""A pool of PostgreSQL connections (psycopg 3), each bound to one site.

Every connection sets `telerad.site` when the pool opens it; the schema's row-level
security policies then show and accept that site's rows only, and new rows take the site
by default. So the catalog's statements never name a site and cannot reach another's.

A round trip is most of what a statement costs here, on both sides: a lone read runs
without a transaction around it, and a pooled connection is checked without one.
"""

from __future__ import annotations

import functools
import logging
import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from telerad.runtime.store.sql.database import Dialect

log = logging.getLogger(__name__)


def _integer(column: str) -> str:
    # CAST of a text that is not a number fails in PostgreSQL; IS values may be anything.
    return (
        f"(CASE WHEN {column} ~ '^ *[-+]{{0,1}}[0-9]{{1,18}} *$' THEN CAST({column} AS BIGINT) END)"
    )


DIALECT = Dialect(
    name="postgresql",
    integer=_integer,
    wildcard="LIKE",
    nocase="ILIKE",
    modalities=(
        "(SELECT string_agg(DISTINCT m.modality, '\\' ORDER BY m.modality) FROM series m"
        " WHERE m.study_uid = s.study_uid AND m.modality IS NOT NULL)"
    ),
    series_order="se.seq",
    conflict=lambda key: f"(site, {key})",
    lock_study=(
        "SELECT pg_advisory_xact_lock(hashtextextended(current_setting('telerad.site')"
        " || '/' || ?, 0))"
    ),
    # Payloads are the site and a model name, never patient data; the channel is the
    # database's, so listeners keep their own site's.
    notify="SELECT pg_notify(?, current_setting('telerad.site') || '/' || ?)",
    for_update=" FOR UPDATE",
)
LISTEN_RETRY_S = 1.0

MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(1953655140, 1)"
"""Migrators of one database take turns (a key of its own: the two-key space)."""


@functools.lru_cache(maxsize=512)
def _statement(text: str) -> str:
    # The catalog's `?` become psycopg's %s; a literal % (none is a value) is doubled.
    return text.replace("%", "%%").replace("?", "%s")


def _check(conn: psycopg.Connection[Any]) -> None:
    """Whether a pooled connection still works, without a round trip while it has
    nothing to read: a server that ends a session (a restart, a failover, an idle
    timeout, pg_terminate_backend) says why and closes it, and both make the socket
    readable. Then the pool's own check runs, and replaces the connection if it fails."""
    poll = select.poll()
    poll.register(conn.fileno(), select.POLLIN | select.POLLPRI)
    if poll.poll(0):
        ConnectionPool.check_connection(conn)


class _Transaction:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self._conn.execute(_statement(sql), args)

    def executemany(self, sql: str, args: Iterable[Sequence[Any]], /) -> object:
        with self._conn.cursor() as cursor:
            cursor.executemany(_statement(sql), args)
        return None


class PostgresDatabase:
    """`Database` on a pool of connections to one database, as one site."""

    dialect = DIALECT

    def __init__(
        self,
        url: str,
        *,
        site: str,
        password: str | None,
        max_connections: int = 16,
        connect_timeout_s: float = 10.0,
        wait_s: float = 5.0,
    ) -> None:
        """`connect_timeout_s` bounds the first connection (at start) and each new one;
        `wait_s` bounds how long a statement waits for a connection while the server is
        unreachable. A C-STORE waits at most twice (its read, then its write) before it is
        refused with a status, and that must come well inside the sender's DIMSE timeout
        (30 s in pynetdicom, the shortest common default), on a loaded machine too."""
        self._url, self._site, self._password = url, site, password
        self._closed = threading.Event()
        self._listeners: list[threading.Thread] = []

        def configure(conn: psycopg.Connection[Any]) -> None:
            # Once per connection, for its whole life (a gateway serves one site).
            conn.execute("SELECT set_config('telerad.site', %s, false)", (site,))

        kwargs = self._connect_kwargs(connect_timeout_s)
        self.pool = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=max_connections,
            configure=configure,
            # A connection the server dropped (a restart, a failover) looks idle in the
            # pool until used: checked when handed out, it is replaced instead of failing
            # the request it was given to.
            check=_check,
            timeout=wait_s,
            open=False,
            name=f"catalog-{site}",
        )
        # Fails here, clearly, when the database cannot be reached at all.
        self.pool.open(wait=True, timeout=connect_timeout_s)

    @contextmanager
    def write(self) -> Iterator[_Transaction]:
        # Committed when the block ends, rolled back when it raises.
        with self.pool.connection() as conn, conn.transaction():
            yield _Transaction(conn)

    # A read is a transaction too (one that writes nothing), for statements that must
    # agree with each other.
    read = write

    def query(self, sql: str, args: Sequence[Any] = (), /) -> list[Any]:
        # One statement sees one state by itself: no BEGIN and COMMIT around it.
        with self.pool.connection() as conn:
            return conn.execute(_statement(sql), args).fetchall()

    def _connect_kwargs(self, timeout_s: float) -> dict[str, Any]:
        # Transactions are explicit (`conn.transaction()`): a lone read needs none.
        kwargs: dict[str, Any] = {"connect_timeout": max(1, round(timeout_s)), "autocommit": True}
        if self._password is not None:
            kwargs["password"] = self._password
        return kwargs

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """On a connection of its own (a pooled one would miss notices between uses), in a
        thread that reconnects after the database comes back."""
        thread = threading.Thread(
            target=self._listen, args=(channel, handler), name=f"listen-{channel}", daemon=True
        )
        self._listeners.append(thread)
        thread.start()

    def _listen(self, channel: str, handler: Callable[[str], None]) -> None:
        mine = f"{self._site}/"
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._url, **self._connect_kwargs(LISTEN_RETRY_S * 5)) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    # Whatever was queued while this was not listening.
                    handler("")
                    while not self._closed.is_set():
                        for notice in conn.notifies(timeout=LISTEN_RETRY_S):
                            if notice.payload.startswith(mine):
                                handler(notice.payload.removeprefix(mine))
            except psycopg.Error as exc:
                log.warning("catalog notices: %s; listening again in %.0f s", exc, LISTEN_RETRY_S)
                self._closed.wait(LISTEN_RETRY_S)

    def close(self) -> None:
        self._closed.set()
        for thread in self._listeners:
            thread.join(LISTEN_RETRY_S * 2)
        self.pool.close()
