"""The port of a storage tier: where instance files go, durably, and come back from.

Two adapters: `files.DiskTier` (a directory: fsync'd, linked) and `objects.ObjectTier`
(an S3 bucket: create-only PUTs, the 200 the durability point). `tiers.open_tiers` is the
one place that picks one. Both take a data set as it arrives in a local `Staged` file
(sealed when the site encrypts at rest) and name files by their path relative to the
tier (`files.instance_path`), never by where they lie.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from telerad.runtime.store.envelope import Keyring, Rewrap
from telerad.runtime.store.files import Staged


class Archived(OSError):
    """A file in an archive storage class: it must be restored (`Tier.restore`) before
    it is read. Its message names the tier, never the file (names hold UIDs)."""


class Tier(Protocol):
    name: str
    keyring: Keyring | None

    def receive(self) -> Staged:
        """An empty local file for a data set's bytes as they arrive."""

    def claim(
        self, staged: Staged, names: Iterable[tuple[int, PurePosixPath]]
    ) -> tuple[int, PurePosixPath]:
        """Store a staged file under the first of `names` still free; two writers never
        get the same name. Returns the name taken."""

    def settle(self, staged: Staged) -> None:
        """Make a claimed file durable and drop what staged it: after this, and only
        after, may it be acknowledged."""

    def write(self, relative: PurePosixPath, chunks: Iterable[bytes]) -> int:
        """Durably write (or replace) a file; returns its size."""

    def read(self, relative: PurePosixPath) -> bytes: ...

    def chunks(self, relative: PurePosixPath) -> Iterator[bytes]:
        """A file's bytes a chunk at a time; a missing one raises FileNotFoundError at
        the first."""

    def exists(self, relative: PurePosixPath) -> bool: ...

    def check(self, relative: PurePosixPath) -> None:
        """Raise what reading the file would, without reading it (`Archived` included)."""

    def restore(self, relative: PurePosixPath) -> int:
        """Start bringing an archived file back to where it can be read (again, if it
        was already asked for); seconds until it is worth asking again."""

    def remove(self, relative: PurePosixPath) -> None:
        """Delete a file; missing is fine."""

    def remove_tree(self, relative: PurePosixPath) -> None:
        """Delete everything under a study's path; missing is fine."""

    def prune(self, relative: PurePosixPath) -> None:
        """Drop what is left empty under a study's path."""

    def free_bytes(self) -> int:
        """Free space where data sets are received."""

    def sweep_temporaries(self, before: float) -> int:
        """Remove staged files a crash left behind: those last written before `before`
        (a POSIX time; later ones may be another gateway's stores in flight)."""

    def sweep_uncatalogued(self, catalogued: Callable[[str, str], set[str]], before: float) -> int:
        """Remove files no catalog row names (`catalogued(tier, study)`) last written
        before `before`."""

    def rewrap(self) -> Iterator[Rewrap]:
        """Wrap every file's data key with the keyring's current key, file by file,
        yielding what was done to each."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored file, to send on: its size as catalogued and its bytes."""

    tier: Tier
    relative: PurePosixPath
    size: int

    def read(self) -> bytes:
        return self.tier.read(self.relative)

    def chunks(self) -> Iterator[bytes]:
        return self.tier.chunks(self.relative)
