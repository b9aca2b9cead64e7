"""The port a SQL backend adapts: transactions that run statements with `?` parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Transaction(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Cursor:
        """Run one statement; `?` marks each parameter (never a value in the text)."""

    def executemany(self, sql: str, args: Iterable[Sequence[Any]], /) -> object: ...


class Database(Protocol):
    dialect: Dialect

    def write(self) -> AbstractContextManager[Transaction]:
        """A transaction that may write, committed when the block ends (rolled back when it
        raises): durable once the block returns."""

    def read(self) -> AbstractContextManager[Transaction]:
        """A transaction that only reads, seeing one consistent state."""

    def query(self, sql: str, args: Sequence[Any] = (), /) -> list[Any]:
        """The rows of one statement that only reads, run by itself (consistent as one
        statement is, without a transaction's round trips)."""

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call `handler(payload)` for each notice sent on `channel` by other connections
        (a no-op where one process queues every job)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the backends spell differently, and nothing else."""

    name: str
    integer: Callable[[str], str]
    """A text column as an integer, for sorting and comparing numbers (NULL when it is
    not one)."""
    wildcard: str
    """The case-sensitive pattern operator: GLOB (`*`, `?`), else LIKE with an escape."""
    nocase: str
    """The case-insensitive LIKE."""
    modalities: str
    """The study's distinct modalities, sorted, joined by backslashes (over s.study_uid)."""
    series_order: str
    """Series in the order they were first catalogued (over se)."""
    conflict: Callable[[str], str]
    """The ON CONFLICT target of a table's key column(s)."""
    lock_study: str | None
    """A statement taking a transaction-long lock on one study (its UID the parameter), so
    that concurrent writers of a study take turns; None where every write takes turns."""
    notify: str | None
    """A statement sending a notice (channel, payload the parameters) when the
    transaction commits; None where no other process listens."""
    for_update: str
    """Appended to a SELECT of rows the transaction goes on to change, so that concurrent
    writers of a row take turns ("" where every write takes turns); with SKIP LOCKED, a
    claim takes a row no other claim holds."""
