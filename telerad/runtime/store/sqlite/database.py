"""One SQLite file (WAL, full sync), shared by a process's threads and by its processes.

`synchronous=FULL` makes every commit durable before it returns: the C-STORE response
waits for it. Every write takes the write lock up front (`BEGIN IMMEDIATE`) so a claim or
a completion never interleaves with another; several processes may share the file.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from telerad.runtime.store.sql.database import Dialect

DIALECT = Dialect(
    name="sqlite",
    integer=lambda column: f"CAST({column} AS INTEGER)",
    wildcard="GLOB",
    # SQLite's LIKE folds ASCII case.
    nocase="LIKE",
    modalities=(
        "(SELECT group_concat(modality, '\\') FROM (SELECT DISTINCT m.modality FROM series m"
        " WHERE m.study_uid = s.study_uid AND m.modality IS NOT NULL ORDER BY m.modality))"
    ),
    series_order="se.rowid",
    conflict=lambda key: f"({key})",
    # Every write holds the database's one write lock.
    lock_study=None,
    notify=None,
    for_update="",
)


class SQLiteDatabase:
    """`Database` on one file; safe to share between the process's threads."""

    dialect = DIALECT

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self._lock = threading.RLock()
        self._writer_lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        # Writers in other processes queue on a file lock, which wakes the next one the
        # moment it is released; SQLite's own busy handler would sleep 1, 2, 5, 10 ms...
        with self._lock:
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = (), /) -> list[Any]:
        with self._lock:
            # Outside BEGIN, one statement is a transaction of its own.
            return self._db.execute(sql, args).fetchall()

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Nothing to hear: one gateway process queues every job of its site."""

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._writer_lock)
