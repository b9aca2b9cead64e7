"""The audit trail as JSON lines, one file per UTC day: the embedded default, beside the
SQLite catalog on the hot tier, in files operators may ship as they are.

Each record is written with a single `write` on an `O_APPEND` descriptor, so lines from
concurrent requests, and from the site's several receiver processes, never interleave.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telerad.runtime.store.audit import AuditUnavailable, stamped


class AuditFiles:
    """`AuditTrail` in `directory`: `audit-YYYY-MM-DD.jsonl`, pruned by retention."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._day = ""
        self._lock = threading.Lock()

    def _file(self, now: float) -> int:
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        if self._fd is None or day != self._day:
            if self._fd is not None:
                os.close(self._fd)
            path = self.directory / f"audit-{day}.jsonl"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._day = day
        return self._fd

    def write(self, record: Mapping[str, Any]) -> None:
        now = time.time()
        line = json.dumps(stamped(record, now), separators=(",", ":"))
        with self._lock:
            try:
                os.write(self._file(now), line.encode() + b"\n")
            except OSError as exc:
                raise AuditUnavailable(f"audit file in {self.directory}: {exc}") from None

    def sync(self) -> None:
        """Flush to disk, so a crash of the machine loses at most the last second."""
        with self._lock:
            if self._fd is not None:
                os.fdatasync(self._fd)

    def prune(self, now: float, retention_days: int) -> None:
        """Delete day files older than the data they describe may live."""
        cutoff = datetime.fromtimestamp(now - retention_days * 86400, UTC).strftime("%Y-%m-%d")
        for path in self.directory.glob("audit-*.jsonl"):
            if path.stem.removeprefix("audit-") < cutoff:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
