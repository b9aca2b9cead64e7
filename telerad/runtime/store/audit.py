"""The audit trail's port: who did what through the site's DICOM and HTTP ports, one
record per HTTP request, DICOM association and delivery attempt, append-only.

Records are JSON objects that never hold patient data (callers hash UIDs and leave query
values out); the trail stamps each with the time it was written. `telerad.runtime.store.
backends.open_audit` gives the one the site's catalog goes with: day files under the hot
tier beside an SQLite catalog, the catalog's append-only `audit` table on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol


class AuditUnavailable(Exception):
    """A record could not be kept; the message says why (never what the record holds)."""


class AuditTrail(Protocol):
    def write(self, record: Mapping[str, Any]) -> None:
        """Keep one record, stamped with the time now: once this returns, it is in the
        trail and survives the process (a crash of the machine or the database server
        may lose the last second). AuditUnavailable when it cannot be kept. May wait on
        I/O: callers on an event loop run it in a thread."""

    def sync(self) -> None:
        """Make what was written durable; called once a second."""

    def prune(self, now: float, retention_days: int) -> None:
        """Remove what is older than the data it describes may live, where the gateway
        may remove records at all."""

    def close(self) -> None: ...


def stamped(record: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The record as the trail keeps it: its time (UTC, milliseconds) first."""
    return {"time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), **record}
