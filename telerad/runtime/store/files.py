"""Instance files on a disk tier (the POSIX adapter of `tier.Tier`): where they go and
how they get there durably, sealed (`envelope`) when the site encrypts at rest.

A file becomes visible under its final name only once its bytes are on disk (temporary
file, fsync, rename, fsync of the directory), so a crash at any moment leaves either the
whole file or no file, never a torn one. Paths are built only from validated UIDs.

A data set being received is written as it arrives to a temporary file in the tier's
`incoming` directory (its study and series are known only once it is whole); on the same
volume, so it takes its final name by a link, never a copy. On an encrypted tier it is
sealed as it arrives: no plaintext byte of an instance is written to disk, not even while
it is being received.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from telerad.runtime.dataset import Pieces, valid_uid
from telerad.runtime.store.envelope import Keyring, Opened, Rewrap, Sealer, open_file, rewrap

STUDIES = "studies"
INCOMING = "incoming"
_TMP_SUFFIX = ".tmp"
CHUNK = 1 << 20
"""What large files are read and copied in: a 2 GiB instance never sits in memory."""
WHOLE = 8 << 20
"""A sealed data set up to this size is opened in memory whole to be checked."""


def instance_path(study_uid: str, series_uid: str, sop_uid: str, version: int) -> PurePosixPath:
    """Relative path of an instance within a tier; versions after the first get a suffix."""
    for uid in (study_uid, series_uid, sop_uid):
        if not valid_uid(uid):
            raise ValueError(f"not a valid UID: {uid!r}")
    name = f"{sop_uid}.dcm" if version == 1 else f"{sop_uid}.v{version}.dcm"
    return PurePosixPath(STUDIES, study_uid, series_uid, name)


def study_dir(study_uid: str) -> PurePosixPath:
    if not valid_uid(study_uid):
        raise ValueError(f"not a valid UID: {study_uid!r}")
    return PurePosixPath(STUDIES, study_uid)


@dataclass(slots=True)
class Staged:
    """A file being written, open, under its temporary name."""

    path: Path
    fd: int
    keyring: Keyring | None = None
    """Set on an encrypted tier: the file holds a sealed object."""
    sealer: Sealer | None = None
    """Until `complete`: what seals the bytes still to come."""
    size: int = 0
    """Bytes written (before sealing)."""
    final: Path | None = None
    """The name `DiskTier.claim` gave it."""

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        _write_all(self.fd, data if self.sealer is None else self.sealer.update(data))

    def discard(self) -> None:
        """Close it and remove its temporary name (a name `claim` gave it stays)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def complete(self) -> None:
        """No more bytes: seal the last segment (nothing to do on a plain tier)."""
        if self.sealer is not None:
            _write_all(self.fd, self.sealer.final())
            self.sealer = None

    @contextlib.contextmanager
    def plaintext(self, start: int = 0) -> Iterator[memoryview | Pieces]:
        """The bytes written from `start`: the file mapped read-only, or, sealed, opened
        (in memory up to `WHOLE`, else a segment at a time where they are read; never
        plain on disk)."""
        self.complete()
        if self.keyring is not None:
            source, opened = open_file(self.path, self.keyring, "an instance being received")
            with source:
                # A common data set is opened whole: read a piece at a time, each element
                # of its header is a call through the envelope.
                yield (
                    memoryview(opened.read())[start:]
                    if len(opened) <= WHOLE
                    else _After(opened, start)
                )
            return
        with self.path.open("rb") as file:
            yield mapped(file)[start:]

    def chunks(self, start: int = 0) -> Iterator[bytes]:
        """The bytes written from `start`, `CHUNK` at a time."""
        self.complete()
        yield from _skip(_chunks(self.path, self.keyring, "an instance being received"), start)


@dataclass(frozen=True, slots=True)
class _After:
    """An opened sealed file from `start` on."""

    whole: Opened
    start: int

    def __len__(self) -> int:
        return len(self.whole) - self.start

    def __getitem__(self, piece: slice, /) -> bytes:
        begin, end, _ = piece.indices(len(self))
        return self.whole[self.start + begin : self.start + end]


def mapped(file: BinaryIO) -> memoryview:
    """An open file's bytes, mapped read-only. Unmapped when the last view of it goes
    (never closed here: an exception's traceback may still hold a view)."""
    if not os.fstat(file.fileno()).st_size:
        return memoryview(b"")
    return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _chunks(path: Path, keyring: Keyring | None, name: str) -> Iterator[bytes]:
    """A file's bytes (opened, when sealed), about `CHUNK` at a time."""
    if keyring is None:
        with path.open("rb") as plain:
            while chunk := plain.read(CHUNK):
                yield chunk
        return
    source, opened = open_file(path, keyring, name)
    with source:
        pending = bytearray()
        for segment in opened.chunks():
            pending += segment
            if len(pending) >= CHUNK:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)


def _skip(chunks: Iterator[bytes], start: int) -> Iterator[bytes]:
    for chunk in chunks:
        if start >= len(chunk):
            start -= len(chunk)
            continue
        yield chunk[start:] if start else chunk
        start = 0


class DiskTier:
    """One storage tier rooted at a directory."""

    def __init__(self, name: str, root: Path, keyring: Keyring | None = None) -> None:
        self.name = name
        self.root = root
        self.keyring = keyring
        self._what = f"an instance on the {name} tier"
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def path(self, relative: PurePosixPath) -> Path:
        """Where a file lies; its bytes are read through `read` and `chunks` (sealed on an
        encrypted tier)."""
        return self.root / relative

    def stage(self, directory: PurePosixPath, chunks: Iterable[bytes]) -> Staged:
        """Write a file under a temporary name in `directory` (not yet flushed)."""
        staged = self._open(self.path(directory))
        try:
            for chunk in chunks:
                staged.write(chunk)
        except BaseException:
            staged.discard()
            raise
        return staged

    def receive(self) -> Staged:
        """An empty file in the incoming directory, for bytes as they arrive."""
        return self._open(self.root / INCOMING)

    def _open(self, target: Path) -> Staged:
        self._ensure_dir(target)
        tmp = target / f".{secrets.token_hex(8)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileNotFoundError:
            # Another process (the lifecycle pass) removed a directory this one had seen.
            self._forget(target)
            self._ensure_dir(target)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        if self.keyring is None:
            return Staged(tmp, fd)
        try:
            sealer = Sealer(self.keyring)
            _write_all(fd, sealer.header)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Staged(tmp, fd, self.keyring, sealer)

    def claim(
        self, staged: Staged, names: Iterable[tuple[int, PurePosixPath]]
    ) -> tuple[int, PurePosixPath]:
        """Give a staged file the first of `names` that is free; the link fails on a taken
        name, so two receivers never take the same one. Returns the name taken."""
        if not staged.path.is_relative_to(self.root):
            raise ValueError(f"{staged.path} was not staged in tier {self.name}")
        staged.complete()
        for number, relative in names:
            final = self.path(relative)
            self._ensure_dir(final.parent)
            try:
                try:
                    os.link(staged.path, final)
                except FileNotFoundError:
                    # The lifecycle pass removed a directory this process had seen.
                    self._forget(final.parent)
                    self._ensure_dir(final.parent)
                    os.link(staged.path, final)
            except FileExistsError:
                continue
            staged.final = final
            return number, relative
        raise ValueError("no free name offered")

    def settle(self, staged: Staged) -> None:
        """Flush a claimed file and its directory, and drop the temporary name. One
        journal commit carries the data, the inode and the new name on ext4 and XFS; the
        directory flush makes the name durable everywhere else."""
        if staged.final is None:
            raise ValueError(f"{staged.path} was never claimed")
        # The temporary name goes first, so the one flush of the file carries the data,
        # the inode, the new name and the removal of the old one together. (A temporary
        # name that a crash brings back is swept at the next start.)
        staged.path.unlink()
        try:
            os.fsync(staged.fd)
        finally:
            os.close(staged.fd)
        _fsync_dir(staged.final.parent)

    def write(self, relative: PurePosixPath, chunks: Iterable[bytes]) -> int:
        """Durably write (or replace) a file under `relative`; returns its size."""
        staged = self.stage(relative.parent, chunks)
        try:
            staged.complete()
            os.fsync(staged.fd)
        finally:
            os.close(staged.fd)
        os.replace(staged.path, self.path(relative))
        _fsync_dir(self.path(relative.parent))
        return staged.size

    def remove(self, relative: PurePosixPath) -> None:
        self.path(relative).unlink(missing_ok=True)

    def read(self, relative: PurePosixPath) -> bytes:
        if self.keyring is None:
            return self.path(relative).read_bytes()
        source, opened = open_file(self.path(relative), self.keyring, self._what)
        with source:
            return opened.read()

    def chunks(self, relative: PurePosixPath) -> Iterator[bytes]:
        """A file's bytes, about `CHUNK` at a time (a missing file raises at the first)."""
        return _chunks(self.path(relative), self.keyring, self._what)

    def check(self, relative: PurePosixPath) -> None:
        """Raise what reading the file would (missing, or a sealed one the keyring cannot
        open) without reading it: answers can fail before their first byte."""
        if self.keyring is None:
            self.path(relative).stat()
            return
        source, _ = open_file(self.path(relative), self.keyring, self._what)
        source.close()

    def restore(self, relative: PurePosixPath) -> int:
        """Nothing to do: a directory has no archive class, its files are always readable."""
        return 0

    def exists(self, relative: PurePosixPath) -> bool:
        return self.path(relative).is_file()

    def remove_tree(self, relative: PurePosixPath) -> None:
        """Delete a study's directory; missing is fine (a rerun after a crash)."""
        target = self.path(relative)
        shutil.rmtree(target, ignore_errors=True)
        self._forget(target)
        if target.parent.exists():
            _fsync_dir(target.parent)

    def prune(self, relative: PurePosixPath) -> None:
        """Remove a study's directories that are empty (its series', then its own)."""
        target = self.path(relative)
        if not target.exists():
            return
        for directory in [*sorted(target.rglob("*"), reverse=True), target]:
            if directory.is_dir():
                with contextlib.suppress(OSError):  # not empty: something arrived
                    directory.rmdir()
        self._forget(target)
        _fsync_dir(target.parent)

    def _forget(self, target: Path) -> None:
        with self._lock:
            self._known_dirs = {d for d in self._known_dirs if not d.is_relative_to(target)}

    def rewrap(self) -> Iterator[Rewrap]:
        """Wrap every stored file's data key with the keyring's current key, file by file,
        yielding what it did to each: no image byte is rewritten, each file is flushed
        before the next, and a rerun after a crash finds the finished ones unchanged. Safe
        beside a running gateway (readers use the old slot until the new one is whole)."""
        if self.keyring is None:
            raise ValueError(f"the {self.name} tier is not encrypted")
        studies = self.root / STUDIES
        for file in sorted(studies.rglob("*.dcm")) if studies.exists() else ():
            try:
                yield rewrap(file, self.keyring, self._what)
            except FileNotFoundError:
                continue  # moved to another tier or deleted meanwhile

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def sweep_temporaries(self, before: float) -> int:
        """Remove temporary files a crash left behind (never acknowledged) that were last
        written before `before`: a store in flight writes its file as its bytes come."""
        removed = 0
        for directory in (self.root / STUDIES, self.root / INCOMING):
            if not directory.exists():
                continue
            for tmp in directory.rglob(f".*{_TMP_SUFFIX}"):
                removed += _remove_if_older(tmp, before)
        return removed

    def sweep_uncatalogued(self, catalogued: Callable[[str, str], set[str]], before: float) -> int:
        """Remove instance files that no catalog row names (`catalogued(tier, study)`: the
        paths it holds), last written before `before`. A crash between a file's rename and
        its catalog commit leaves one: never acknowledged, it must not become data. A
        newer one may be between those two steps in another gateway of the site."""
        removed = 0
        studies = self.root / STUDIES
        if not studies.exists():
            return 0
        for study in studies.iterdir():
            known = catalogued(self.name, study.name)
            for file in study.rglob("*.dcm"):
                if file.relative_to(self.root).as_posix() not in known:
                    removed += _remove_if_older(file, before)
        return removed

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            # Another association may have just created it; its entry must be durable before
            # we acknowledge anything inside, whoever made it.
            new.mkdir(exist_ok=True)
            _fsync_dir(new.parent)
        with self._lock:
            self._known_dirs.add(directory)


def _remove_if_older(path: Path, before: float) -> int:
    """Remove a file last written before `before`; 1 when it was removed."""
    try:
        if path.stat().st_mtime >= before:
            return 0
        path.unlink()
    except FileNotFoundError:
        return 0  # removed meanwhile (stored on, or swept by a peer)
    return 1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
