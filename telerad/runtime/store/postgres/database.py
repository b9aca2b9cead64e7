"""A pool of PostgreSQL connections (psycopg 3), each bound to one site.

Every connection sets `telerad.site` when the pool opens it; the schema's row-level
security policies then show and accept that site's rows only, and new rows take the site
by default. So the catalog's statements never name a site and cannot reach another's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from telerad.runtime.store.sql.database import Dialect


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
    for_update=" FOR UPDATE",
)

MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(1953655140, 1)"
"""Migrators of one database take turns (a key of its own: the two-key space)."""


@functools.lru_cache(maxsize=512)
def _statement(sql: str) -> str:
    # The catalog's `?` become psycopg's %s; a literal % (none is a value) is doubled.
    return sql.replace("%", "%%").replace("?", "%s")


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
    ) -> None:
        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT set_config('telerad.site', %s, false)", (site,))
            conn.commit()

        kwargs: dict[str, Any] = {"connect_timeout": max(1, round(connect_timeout_s))}
        if password is not None:
            kwargs["password"] = password
        self.pool = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=max_connections,
            configure=configure,
            # A connection the server dropped (a restart, a failover) looks idle in the
            # pool until used: checked when handed out, it is replaced instead of failing
            # the request it was given to.
            check=ConnectionPool.check_connection,
            timeout=connect_timeout_s,
            open=False,
            name=f"catalog-{site}",
        )
        # Fails here, clearly, when the database cannot be reached at all.
        self.pool.open(wait=True, timeout=connect_timeout_s)

    @contextmanager
    def write(self) -> Iterator[_Transaction]:
        # The pool's block commits when it ends and rolls back when it raises.
        with self.pool.connection() as conn:
            yield _Transaction(conn)

    @contextmanager
    def read(self) -> Iterator[_Transaction]:
        with self.pool.connection() as conn:
            yield _Transaction(conn)

    def close(self) -> None:
        self.pool.close()
