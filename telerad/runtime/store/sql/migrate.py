"""Versioned migrations: the schema version is recorded in the database, an older schema
is brought forward in order, a newer one is refused, all in one transaction."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from telerad.runtime.store.catalog import SchemaError
from telerad.runtime.store.sql.database import Database, Transaction

Migration = tuple[str, ...]
"""The statements that take a schema from the version before to this one."""


def migrate(
    db: Database,
    migrations: Sequence[Migration],
    *,
    lock: str | None = None,
    unversioned: Callable[[Transaction], int] | None = None,
) -> int:
    """Bring the schema to the last of `migrations` (version N is `migrations[N - 1]`) and
    return its version. `lock` is a statement that makes concurrent migrators take turns;
    `unversioned` says which version a database from before versioning already has."""
    latest = len(migrations)
    with db.write() as tx:
        if lock is not None:
            tx.execute(lock)
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at DOUBLE PRECISION NOT NULL)"
        )
        current = int(
            tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        )
        if current == 0 and unversioned is not None:
            current = unversioned(tx)
            tx.executemany(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                [(v, time.time()) for v in range(1, current + 1)],
            )
        if current > latest:
            raise SchemaError(
                f"the catalog's schema is at version {current}, written by a newer telerad;"
                f" this one knows versions up to {latest}: run the newer telerad (a schema"
                " is never downgraded)"
            )
        for version in range(current + 1, latest + 1):
            for statement in migrations[version - 1]:
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
    return latest
