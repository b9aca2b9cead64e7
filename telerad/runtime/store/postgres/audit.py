"""The audit trail in the catalog's PostgreSQL: the `audit` table, one row per record,
shared by the site's gateways and kept apart from other sites' by row-level security.

The table is append-only for the gateway (its role has lost UPDATE, DELETE and TRUNCATE
on it, and a trigger refuses them to anyone): records are removed by the database's
administrator, never by a gateway, so `prune` does nothing here (docs/catalog.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import psycopg

from telerad.runtime.store.audit import AuditUnavailable, stamped
from telerad.runtime.store.postgres.database import PostgresDatabase


class AuditTable:
    """`AuditTrail` on the catalog's pool of connections (bound to the site)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def write(self, record: Mapping[str, Any]) -> None:
        now = time.time()
        try:
            with self._db.write() as tx:
                # Committed and visible to the site's other gateways on return; flushed to
                # disk by the server's WAL writer within a fraction of a second, as the
                # audit files are synced once a second, so a request does not wait on it.
                tx.execute("SET LOCAL synchronous_commit TO off")
                tx.execute(
                    "INSERT INTO audit (at, record) VALUES (?, ?)",
                    (now, json.dumps(stamped(record, now), separators=(",", ":"))),
                )
        except psycopg.Error as exc:  # a pool timeout is one too
            raise AuditUnavailable(f"audit table: {type(exc).__name__}: {exc}") from None

    def sync(self) -> None:
        """Nothing to do: the server flushes its WAL by itself."""

    def prune(self, now: float, retention_days: int) -> None:
        """Nothing: the gateway may not delete audit records (the administrator does)."""

    def close(self) -> None:
        """Nothing of its own: the catalog closes the pool."""
