"""Accepting one instance: check it, write it durably, catalogue it, and only then say
yes. C-STORE and STOW-RS both store through here, so both protocols promise the same.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import PurePosixPath

from telerad.api.config import CompiledRule
from telerad.runtime import phi
from telerad.runtime.dataset import Header, InvalidDataset, parse, valid_uid
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.routing import reopens_study
from telerad.runtime.store.catalog import HOT, Added, Catalog, Received
from telerad.runtime.store.files import Tier, instance_path

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1471.1"
IMPLEMENTATION_VERSION = "TELERAD_010"
MAX_DATA_SET = (1 << 32) - 2


class Status(IntEnum):
    """C-STORE statuses (PS3.4 B.2.3) the gateway answers with."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CLASS_MISMATCH_WARNING = 0xB007
    STUDY_MISMATCH = 0xA900
    """STOW-RS to /studies/{study} of an instance of another study (an 0xA9xx "does not
    match" error; PS3.18 leaves the code to the server)."""
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    comment: str | None = None
    """Why it failed, for the sender's log (DIMSE Error Comment, at most 64 chars)."""
    header: Header | None = None
    """What was stored, when it was."""


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
        self._hot = tiers[HOT]
        self._metrics = metrics
        self._min_free = min_free_bytes

    def store(
        self,
        data: bytes,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
        *,
        study_uid: str | None = None,
        result_of: int | None = None,
    ) -> Outcome:
        """Store an encoded data set as received; `sop_*` are what the request announced,
        `study_uid` the study it must belong to, when the request named one, `result_of`
        the job whose result it is."""
        started = time.monotonic()
        checked = self._check(data, transfer_syntax, sop_class_uid, sop_instance_uid)
        if isinstance(checked, Outcome):
            return checked
        header = checked
        if study_uid is not None and header.study_uid != study_uid:
            return self._refuse(
                "wrong-study", Status.STUDY_MISMATCH, "Study Instance UID differs from the request"
            )
        versions = self._catalog.versions(header.sop_instance_uid)
        # A re-send is compared with the current version only: sent A, B, then A again,
        # A is current again (a third version), not a duplicate of the first.
        if versions and self._compare(versions[-1].tier, PurePosixPath(versions[-1].path), data):
            return self._identical(started, header)  # the common re-send, not written again
        # Versions whose file is gone were never acknowledged; their numbers are free.
        taken = {v.version for v in versions if self._present(v.tier, PurePosixPath(v.path))}
        reopens = result_of is None and reopens_study(self._rules, header.sop_class_uid)
        written = self._write(
            header, data, transfer_syntax, calling_ae, taken, result_of=result_of, reopens=reopens
        )
        if isinstance(written, Outcome):
            return written
        received, added = written
        self._report(header, received, added)
        self._metrics.stage("receive", time.monotonic() - started)
        if header.sop_class_uid != sop_class_uid:
            return Outcome(
                Status.CLASS_MISMATCH_WARNING,
                comment="SOP Class UID differs from the request",
                header=header,
            )
        return Outcome(Status.SUCCESS, header=header)

    def _check(
        self, data: bytes, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str
    ) -> Header | Outcome:
        """The data set's header, or why it is refused."""
        if self._hot.free_bytes() - len(data) < self._min_free:
            return self._refuse("out-of-space", Status.OUT_OF_RESOURCES, "storage is full")
        if not valid_uid(sop_instance_uid) or not valid_uid(sop_class_uid):
            return self._refuse("invalid-uid", Status.CANNOT_UNDERSTAND, "invalid UID in request")
        try:
            header = parse(data, transfer_syntax)
        except InvalidDataset as exc:
            return self._refuse("invalid-dataset", Status.CANNOT_UNDERSTAND, str(exc))
        # Inconsistent senders exist (the file meta says one UID, the data set another).
        # The data set is what gets stored and served, so it decides; the sender is told
        # when the standard has a warning for it, and the mismatch is counted either way.
        if header.sop_instance_uid != sop_instance_uid:
            self._metrics.warning("instance-uid-mismatch")
            log.warning("SOP Instance UID of a data set differs from its request; stored as sent")
        if header.sop_class_uid != sop_class_uid:
            self._metrics.warning("class-mismatch")
        return header

    def _write(
        self,
        header: Header,
        data: bytes,
        transfer_syntax: str,
        calling_ae: str,
        taken: set[int],
        *,
        result_of: int | None,
        reopens: bool,
    ) -> tuple[Received, Added] | Outcome:
        """Write the file under the first free version, flush it, then catalogue it."""
        sop = header.sop_instance_uid
        directory = instance_path(header.study_uid, header.series_uid, sop, 1).parent
        meta = file_meta(header.sop_class_uid, sop, transfer_syntax, calling_ae)
        names = (
            (n, instance_path(header.study_uid, header.series_uid, sop, n))
            for n in itertools.count(1)
            if n not in taken
        )
        try:
            staged = self._hot.stage(directory, (meta, data))
        except OSError as exc:
            log.error("write failed: %s", exc.strerror)
            return self._refuse("write-failed", Status.OUT_OF_RESOURCES, "write failed")
        try:
            version, relative = self._hot.claim(staged, names)
            self._hot.settle(staged)
        except OSError as exc:
            self._hot.discard(staged)
            log.error("write failed: %s", exc.strerror)
            return self._refuse("write-failed", Status.OUT_OF_RESOURCES, "write failed")
        received = Received(
            version,
            relative,
            staged.size,
            transfer_syntax,
            calling_ae,
            result_of=result_of,
            reopens=reopens,
        )
        try:
            added = self._catalog.add_instance(header, received, time.time())
        except Exception:
            # Not catalogued means not acknowledged: the file must not stay as if it were.
            self._hot.remove(relative)
            log.exception("catalog write failed for study %s", phi.ref(header.study_uid))
            return self._refuse("catalog-failed", Status.OUT_OF_RESOURCES, "catalog failed")
        if added.restored:
            self._metrics.warning("restored-lost-file")
            log.warning("instance %s: its catalogued file was missing; restored", phi.ref(sop))
        return received, added

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
        return max(0, min(self._hot.free_bytes() - self._min_free, MAX_DATA_SET))

    def too_large(self, size: int) -> Outcome:
        return self._refuse(
            "out-of-space", Status.OUT_OF_RESOURCES, f"data set of {size} bytes does not fit"
        )

    def _compare(self, tier: str, path: PurePosixPath, data: bytes) -> bool:
        """Whether a stored file holds exactly this data set (not when it is missing).
        Only re-sent SOP Instance UIDs get here, so nothing is hashed on the way in."""
        if tier not in self._tiers:
            return False
        try:
            stored = self._tiers[tier].read(path)
        except FileNotFoundError:
            return False
        return stored[meta_length(stored) :] == data

    def _present(self, tier: str, path: PurePosixPath) -> bool:
        return tier in self._tiers and self._tiers[tier].path(path).is_file()

    def _identical(self, started: float, header: Header) -> Outcome:
        self._metrics.duplicate("identical")
        self._metrics.stage("receive", time.monotonic() - started)
        return Outcome(Status.SUCCESS, header=header)

    def _refuse(self, reason: str, status: Status, comment: str) -> Outcome:
        self._metrics.rejection(reason)
        log.warning("instance refused (%s): %s", reason, comment)
        return Outcome(status, comment=comment[:64])


def meta_length(part10: bytes) -> int:
    """Where the data set starts in a file `file_meta` wrote (preamble, DICM, group length)."""
    return 144 + int(struct.unpack_from("<I", part10, 140)[0])


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
