"""Accepting one instance: check it, write it durably, catalogue it, and only then say
yes. C-STORE and STOW-RS both store through here, so both protocols promise the same.
"""

from __future__ import annotations

import itertools
import logging
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from telerad.api.config import HOT, CompiledRule
from telerad.runtime import phi
from telerad.runtime.dataset import (
    DEFLATED_LE,
    EXPLICIT_LE,
    Header,
    InvalidDataset,
    StoreStatus,
    inflate,
    parse,
    valid_uid,
)
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.routing import reopens_study
from telerad.runtime.store.catalog import Added, Catalog, Received
from telerad.runtime.store.envelope import EnvelopeError
from telerad.runtime.store.files import Staged, instance_path, mapped
from telerad.runtime.store.tier import Tier

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1471.1"
IMPLEMENTATION_VERSION = "TELERAD_010"
MAX_DATA_SET = (1 << 32) - 2
FREE_CHECK_BYTES = 64 << 20
"""How often (in bytes written) a data set being received looks at the watermark again."""
_META_PREFIX = 144
"""Preamble, DICM and the group length element: what says where our file meta ends."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: StoreStatus
    comment: str | None = None
    """Why it failed, for the sender's log (DIMSE Error Comment, at most 64 chars)."""
    header: Header | None = None
    """What was stored, when it was."""


class Incoming:
    """A data set as it arrives (C-STORE fragments, a STOW part's body), written at once
    to a temporary file in the hot tier's incoming directory behind the file meta its
    request announced: memory holds one fragment, whatever the size of the data set.
    `Ingest.finish` checks what was written and gives it its final name."""

    def __init__(
        self,
        ingest: Ingest,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
    ) -> None:
        self.transfer_syntax = transfer_syntax
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.calling_ae = calling_ae
        self.size = 0
        """Bytes of data set received, kept or not."""
        self.room = ingest.room()
        self.failed: tuple[str, StoreStatus, str] | None = None
        """Why it will be refused, found while it arrived (rejection reason, status, comment)."""
        self.offset = 0
        """Where the data set starts in the file."""
        self.staged: Staged | None = None
        self._ingest = ingest
        self._checked = 0
        if not valid_uid(sop_instance_uid) or not valid_uid(sop_class_uid):
            self.failed = ("invalid-uid", StoreStatus.CANNOT_UNDERSTAND, "invalid UID in request")
            return
        if self.room <= 0:
            return  # refused as too large once its size is known
        meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        try:
            self.staged = ingest.hot.receive()
            self.staged.write(meta)
        except (OSError, EnvelopeError) as exc:
            # A keyring that cannot be read (its Secret unmounted) refuses like a full disk.
            self._fail(exc)
            return
        self.offset = len(meta)

    def write(self, data: bytes | memoryview) -> None:
        """The next bytes of the data set. Past the room it had, or once the tier falls
        below its free-space watermark, the file goes at once and the rest is only counted."""
        self.size += len(data)
        if self.staged is None:
            return
        if self.size > self.room:
            self.discard()
            return
        try:
            self.staged.write(data)
        except OSError as exc:
            self._fail(exc)
            return
        # Other receivers write to the same volume at the same time: their room was
        # computed apart from this one's, so the watermark is looked at again as it fills.
        if self.size - self._checked >= FREE_CHECK_BYTES:
            self._checked = self.size
            if self._ingest.full():
                self.discard()
                self.failed = ("out-of-space", StoreStatus.OUT_OF_RESOURCES, "storage is full")

    def _fail(self, exc: OSError | EnvelopeError) -> None:
        log.error("write failed: %s", exc.strerror if isinstance(exc, OSError) else exc)
        self.discard()
        self.failed = ("write-failed", StoreStatus.OUT_OF_RESOURCES, "write failed")

    def discard(self) -> None:
        """Drop the file (unless it was stored); nothing of it stays on disk."""
        staged, self.staged = self.staged, None
        if staged is not None:
            staged.discard()


class Ingest:
    def __init__(
        self,
        catalog: Catalog,
        tiers: dict[str, Tier],
        metrics: GatewayMetrics,
        min_free_bytes: int,
        *,
        rules: Sequence[CompiledRule] = (),
    ) -> None:
        self._catalog = catalog
        self._rules = rules
        self._tiers = tiers
        self.hot = tiers[HOT]
        self._metrics = metrics
        self._min_free = min_free_bytes

    def begin(
        self, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, calling_ae: str
    ) -> Incoming:
        """A data set about to arrive, with what its request announced; `finish` it."""
        return Incoming(self, transfer_syntax, sop_class_uid, sop_instance_uid, calling_ae)

    def finish(
        self, incoming: Incoming, *, study_uid: str | None = None, result_of: int | None = None
    ) -> Outcome:
        """Store a data set received whole, as received; `study_uid` is the study it must
        belong to, when the request named one, `result_of` the job whose result it is.
        Whatever the outcome, no temporary file stays behind."""
        try:
            return self._finish(incoming, study_uid, result_of)
        finally:
            incoming.discard()

    def _finish(  # noqa: PLR0911  (one answer per kind of outcome)
        self, incoming: Incoming, study_uid: str | None, result_of: int | None
    ) -> Outcome:
        started = time.monotonic()
        checked = self._check(incoming)
        if isinstance(checked, Outcome):
            return checked
        header = checked
        if study_uid is not None and header.study_uid != study_uid:
            return self._refuse(
                "wrong-study",
                StoreStatus.STUDY_MISMATCH,
                "Study Instance UID differs from the request",
            )
        try:
            versions = self._catalog.versions(header.sop_instance_uid)
        except Exception:
            # A catalog that cannot be read (its database down) refuses the store with a
            # status, as one that cannot be written does: the association goes on.
            log.exception("catalog read failed for study %s", phi.ref(header.study_uid))
            return self._refuse("catalog-failed", StoreStatus.OUT_OF_RESOURCES, "catalog failed")
        # A re-send is compared with the current version only: sent A, B, then A again,
        # A is current again (a third version), not a duplicate of the first.
        try:
            same = bool(versions) and self._compare(
                versions[-1].tier, PurePosixPath(versions[-1].path), incoming
            )
        except EnvelopeError as exc:
            # Whether it is a re-send cannot be known: refused, never a guess.
            log.error("the stored version cannot be opened: %s", exc)
            return self._refuse("unreadable", StoreStatus.OUT_OF_RESOURCES, "cannot read stored")
        if same:
            return self._identical(started, header)  # the common re-send, not written again
        # Versions whose file is gone were never acknowledged; their numbers are free.
        taken = {v.version for v in versions if self._present(v.tier, PurePosixPath(v.path))}
        reopens = result_of is None and reopens_study(self._rules, header.sop_class_uid)
        written = self._write(header, incoming, taken, result_of=result_of, reopens=reopens)
        if isinstance(written, Outcome):
            return written
        received, added = written
        self._report(header, received, added)
        self._metrics.stage("receive", time.monotonic() - started)
        if header.sop_class_uid != incoming.sop_class_uid:
            return Outcome(
                StoreStatus.CLASS_MISMATCH,
                comment="SOP Class UID differs from the request",
                header=header,
            )
        return Outcome(StoreStatus.SUCCESS, header=header)

    def _check(self, incoming: Incoming) -> Header | Outcome:
        """The data set's header, or why it is refused."""
        if incoming.size > incoming.room:
            return self.too_large(incoming.size)
        if incoming.failed is not None:
            return self._refuse(*incoming.failed)
        if incoming.staged is None or self.full():
            return self._refuse("out-of-space", StoreStatus.OUT_OF_RESOURCES, "storage is full")
        try:
            header = self._parse(incoming)
        except InvalidDataset as exc:
            return self._refuse("invalid-dataset", StoreStatus.CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            log.error("reading a received data set failed: %s", exc.strerror)
            return self._refuse("write-failed", StoreStatus.OUT_OF_RESOURCES, "write failed")
        # Inconsistent senders exist (the file meta says one UID, the data set another).
        # The data set is what gets stored and served, so it decides; the sender is told
        # when the standard has a warning for it, and the mismatch is counted either way.
        if header.sop_instance_uid != incoming.sop_instance_uid:
            self._metrics.warning("instance-uid-mismatch")
            log.warning("SOP Instance UID of a data set differs from its request; stored as sent")
        if header.sop_class_uid != incoming.sop_class_uid:
            self._metrics.warning("class-mismatch")
        return header

    def _parse(self, incoming: Incoming) -> Header:
        """The strict check, over the file as written (mapped, or opened)."""
        assert incoming.staged is not None  # noqa: S101  (checked by the caller)
        with incoming.staged.plaintext(incoming.offset) as data:
            plain = incoming.staged.keyring is None
            if incoming.transfer_syntax == DEFLATED_LE and plain and isinstance(data, memoryview):
                # Inflated to a file too: a few kilobytes may become gigabytes.
                with tempfile.TemporaryFile(dir=incoming.staged.path.parent) as inflated:
                    inflate(data, inflated.write)
                    inflated.flush()
                    return parse(mapped(inflated), EXPLICIT_LE)
            # Sealed, a deflated one is inflated in memory: nothing plain goes to disk.
            return parse(data, incoming.transfer_syntax)

    def _write(
        self,
        header: Header,
        incoming: Incoming,
        taken: set[int],
        *,
        result_of: int | None,
        reopens: bool,
    ) -> tuple[Received, Added] | Outcome:
        """Give the file the first free version, flush it, then catalogue it."""
        sop = header.sop_instance_uid
        names = (
            (n, instance_path(header.study_uid, header.series_uid, sop, n))
            for n in itertools.count(1)
            if n not in taken
        )
        try:
            staged = self._staged(header, incoming)
        except OSError as exc:
            log.error("write failed: %s", exc.strerror)
            return self._refuse("write-failed", StoreStatus.OUT_OF_RESOURCES, "write failed")
        try:
            version, relative = self.hot.claim(staged, names)
            self.hot.settle(staged)
        except OSError as exc:
            staged.discard()
            log.error("write failed: %s", exc.strerror)
            return self._refuse("write-failed", StoreStatus.OUT_OF_RESOURCES, "write failed")
        received = Received(
            version,
            relative,
            staged.size,
            incoming.transfer_syntax,
            incoming.calling_ae,
            result_of=result_of,
            reopens=reopens,
        )
        try:
            added = self._catalog.add_instance(header, received, time.time())
        except Exception:
            # Not catalogued means not acknowledged: the file must not stay as if it were.
            self.hot.remove(relative)
            log.exception("catalog write failed for study %s", phi.ref(header.study_uid))
            return self._refuse("catalog-failed", StoreStatus.OUT_OF_RESOURCES, "catalog failed")
        if added.restored:
            self._metrics.warning("restored-lost-file")
            log.warning("instance %s: its catalogued file was missing; restored", phi.ref(sop))
        return received, added

    def _staged(self, header: Header, incoming: Incoming) -> Staged:
        """The file to store: the received one, taken over, when the file meta it was
        written behind names the instance the data set is; else (an inconsistent sender,
        rare) a copy behind the right file meta, made on disk."""
        received = incoming.staged
        assert received is not None  # noqa: S101  (checked by _check)
        if (header.sop_class_uid, header.sop_instance_uid) == (
            incoming.sop_class_uid,
            incoming.sop_instance_uid,
        ):
            incoming.staged = None  # the caller stores it or discards it
            return received
        meta = file_meta(
            header.sop_class_uid,
            header.sop_instance_uid,
            incoming.transfer_syntax,
            incoming.calling_ae,
        )
        staged = self.hot.receive()
        try:
            staged.write(meta)
            for chunk in received.chunks(incoming.offset):
                staged.write(chunk)
        except BaseException:
            staged.discard()
            raise
        return staged

    def _report(self, header: Header, received: Received, added: Added) -> None:
        self._metrics.instances.inc()
        self._metrics.bytes.inc(received.size)
        if received.version > 1 and not added.restored:
            self._metrics.duplicate("new-version")
            log.warning(
                "instance %s of study %s received again with different content: kept as version %d",
                phi.ref(header.sop_instance_uid),
                phi.ref(header.study_uid),
                received.version,
            )
        if added.reopened:
            self._metrics.reopened.inc()
            log.warning("study %s re-opened by a late instance", phi.ref(header.study_uid))

    def room(self) -> int:
        """Bytes one data set may have now: the free space above the watermark, and never
        more than a 32-bit length can describe."""
        return max(0, min(self.hot.free_bytes() - self._min_free, MAX_DATA_SET))

    def full(self) -> bool:
        """Whether the hot tier is below its free-space watermark."""
        return self.hot.free_bytes() < self._min_free

    def too_large(self, size: int) -> Outcome:
        return self._refuse(
            "out-of-space", StoreStatus.OUT_OF_RESOURCES, f"data set of {size} bytes does not fit"
        )

    def _compare(self, tier: str, path: PurePosixPath, incoming: Incoming) -> bool:
        """Whether a stored file holds exactly this data set (not when it is missing).
        Only re-sent SOP Instance UIDs get here, so nothing is hashed on the way in; the
        two files are compared a chunk at a time."""
        if tier not in self._tiers or incoming.staged is None:
            return False
        stored = _Reader(self._tiers[tier].chunks(path))
        try:
            start = meta_length(stored.take(_META_PREFIX))
        except FileNotFoundError:
            return False
        stored.take(start - _META_PREFIX)
        for chunk in incoming.staged.chunks(incoming.offset):
            if stored.take(len(chunk)) != chunk:
                return False
        return stored.take(1) == b""

    def _present(self, tier: str, path: PurePosixPath) -> bool:
        return tier in self._tiers and self._tiers[tier].exists(path)

    def _identical(self, started: float, header: Header) -> Outcome:
        self._metrics.duplicate("identical")
        self._metrics.stage("receive", time.monotonic() - started)
        return Outcome(StoreStatus.SUCCESS, header=header)

    def _refuse(self, reason: str, status: StoreStatus, comment: str) -> Outcome:
        self._metrics.rejection(reason)
        log.warning("instance refused (%s): %s", reason, comment)
        return Outcome(status, comment=comment[:64])


class _Reader:
    """Exactly so many bytes at a time from a stream of chunks (fewer only at its end)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def take(self, count: int) -> bytes:
        while len(self._pending) < count:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._pending += chunk
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken


def meta_length(part10: bytes) -> int:
    """Where the data set starts in a file `file_meta` wrote (preamble, DICM, group length)."""
    return _META_PREFIX + int(struct.unpack_from("<I", part10, 140)[0])


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble and File Meta Information (PS3.10 7.1) in explicit VR little endian."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class)),
            _element(0x0003, b"UI", _uid(sop_instance)),
            _element(0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION.encode(), b" ")),
            _element(0x0016, b"AE", _even(source_ae.strip().encode("ascii", "replace"), b" ")),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _uid(value: str) -> bytes:
    return _even(value.encode("ascii"), b"\x00")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"UN", b"OW"):
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
