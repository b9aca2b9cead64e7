"""Reading what a sender gave us, without trusting it.

The gateway stores data sets exactly as received, so it never decodes them with pydicom
(which re-encodes on write and silently accepts truncated input). Instead one strict pass
walks the encoded elements, proves that every length fits and that the data set ends where
its last element ends, and lifts out the few top-level attributes that storage, routing and
QIDO need. Anything else is an `InvalidDataset` naming what was wrong and where.
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Protocol

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"

UID_MAX: Final = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQ_END: Final = 0xFFFEE0DD
# VRs whose explicit encoding has a 2-byte reserved field and a 4-byte length.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_DEPTH: Final = 32
# A deflated data set may not inflate past this: a few kilobytes must not become gigabytes.
_MAX_INFLATED: Final = 4 << 30


class StoreStatus(IntEnum):
    """Storage statuses: the C-STORE ones (PS3.4 B.2.3) the gateway answers with, which are
    also STOW-RS's FailureReason and WarningReason values (PS3.18 10.5.3 borrows them)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    STUDY_MISMATCH = 0xA900
    """The instance's study is not the one in the STOW-RS URL. PS3.18 leaves the code to the
    server; this is the 0xA9xx "data set does not match SOP class" error (dcm4chee uses its
    own 0xC409)."""
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    COERCED = 0xB000
    """Warning: stored with some attributes changed."""
    CLASS_MISMATCH = 0xB007
    """Warning: stored, but the data set does not match the SOP class."""


class InvalidDataset(ValueError):
    """The encoded data set is not well-formed DICOM; the message says where."""


def valid_uid(value: str) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numbers, no leading zeros, at most 64 chars.

    Path components are built from UIDs, so this is also what keeps `..`, `/` and every
    other trick out of the file system."""
    return len(value) <= UID_MAX and _UID.fullmatch(value) is not None


# Attributes lifted from the top level of each instance: (group << 16 | element) -> name.
TAGS: Final[dict[int, str]] = {
    0x00080005: "specific_character_set",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080030: "study_time",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00080090: "referring_physician",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x00100030: "patient_birth_date",
    0x00100040: "patient_sex",
    0x00180015: "body_part",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
    0x00200010: "study_id",
    0x00200011: "series_number",
    0x00200013: "instance_number",
    0x00201208: "study_related_instances",
    0x00280008: "number_of_frames",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
}
_TEXT_VRS: Final = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


@dataclass(frozen=True, slots=True)
class Header:
    """What the gateway keeps of one instance besides its bytes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    values: dict[str, str] = field(default_factory=dict)
    """Other attributes of `TAGS` present in the data set, decoded to text."""

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def integer(self, name: str) -> int | None:
        raw = self.values.get(name)
        try:
            return int(raw) if raw else None
        except ValueError:
            return None


class Pieces(Protocol):
    """An encoded data set read a piece at a time where it is asked for (a sealed file,
    opened segment by segment): as with a mapped file, a 2 GiB pixel data element that the
    check steps over is never read."""

    def __len__(self) -> int: ...

    def __getitem__(self, piece: slice, /) -> bytes: ...


Buffer = bytes | bytearray | memoryview | mmap.mmap
"""An encoded data set: in memory, or a file mapped into it (only the pages walked over
become resident, so a 2 GiB pixel data element costs nothing)."""


def parse(data: Buffer | Pieces, transfer_syntax: str) -> Header:
    """Check the whole encoded data set and return its header; raise `InvalidDataset`.
    A deflated one is inflated in memory: `inflate` it to a file first where it may be
    large."""
    if transfer_syntax == DEFLATED_LE:
        if not isinstance(data, Buffer):
            data = data[0 : len(data)]
        out = bytearray()
        inflate(data, out.extend)
        data, transfer_syntax = out, EXPLICIT_LE
    walker = _Walker(data, little=transfer_syntax != EXPLICIT_BE)
    found: dict[int, tuple[str, bytes]] = {}
    end = walker.elements(0, len(walker.buf), transfer_syntax == IMPLICIT_LE, 0, found)
    if end != len(walker.buf):
        raise InvalidDataset(f"trailing bytes after the data set at offset {end}")
    return _header(found, little=transfer_syntax != EXPLICIT_BE)


def inflate(data: Buffer, sink: Callable[[bytes], object], piece: int = 1 << 20) -> None:
    """Inflate a deflated data set (raw deflate, PS3.5 A.5) into `sink`, `piece` bytes of
    input at a time and never past `_MAX_INFLATED` of output."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)
    total = 0
    try:
        for start in range(0, len(view), piece):
            pending = view[start : start + piece]
            while pending:
                out = inflater.decompress(pending, piece)
                total += len(out)
                if total > _MAX_INFLATED:
                    raise InvalidDataset("deflated data set inflates past the size limit")
                sink(out)
                pending = memoryview(inflater.unconsumed_tail)
                if inflater.eof:
                    break
            if inflater.eof:
                break
        if not inflater.eof:
            # What is still inside the inflater without more input.
            while out := inflater.decompress(b"", piece):
                total += len(out)
                if total > _MAX_INFLATED:
                    raise InvalidDataset("deflated data set inflates past the size limit")
                sink(out)
    except zlib.error as exc:
        raise InvalidDataset(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise InvalidDataset("deflated data set is truncated")


class _Walker:
    """One pass over an encoded data set, sequences and items included."""

    def __init__(self, data: Buffer | Pieces, *, little: bool) -> None:
        self.buf: memoryview | Pieces = data if not isinstance(data, Buffer) else memoryview(data)
        self.tag_fmt, self.u32 = ("<HH", "<I") if little else (">HH", ">I")
        self.u16 = self.u32.replace("I", "H")

    def tag(self, pos: int) -> int:
        group, elem = struct.unpack(self.tag_fmt, self.buf[pos : pos + 4])
        return int(group << 16 | elem)

    def length(self, pos: int) -> int:
        return int(struct.unpack(self.u32, self.buf[pos : pos + 4])[0])

    def elements(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        found: dict[int, tuple[str, bytes]] | None,
        *,
        in_item: bool = False,
    ) -> int:
        """Walk elements to `end` (or to the item delimiter when `in_item` and the item has
        no length); return where it stopped. `found` collects top-level `TAGS`."""
        if depth > _MAX_DEPTH:
            raise InvalidDataset(f"sequences nested deeper than {_MAX_DEPTH} at offset {pos}")
        last_tag = -1
        while pos < end:
            if end - pos < 8:
                raise InvalidDataset(f"truncated element header at offset {pos}")
            tag = self.tag(pos)
            if tag == _ITEM_END:
                if not in_item:
                    raise InvalidDataset(f"item delimiter outside an item at offset {pos}")
                return pos + 8
            if tag <= last_tag and found is not None:
                raise InvalidDataset(f"element {_name(tag)} out of order at offset {pos}")
            last_tag = tag
            vr, length, pos = self.header(pos, end, implicit)
            if length == _UNDEFINED:
                pos = self.undefined(tag, vr, pos, end, implicit=implicit, depth=depth)
                continue
            if length > end - pos:
                raise InvalidDataset(
                    f"element {_name(tag)} claims {length} bytes but {end - pos} remain"
                    f" at offset {pos}"
                )
            if vr == "SQ" or (implicit and length and _known_sequence(tag)):
                # Defined-length sequences are walked too: nothing inside may be broken.
                self.items(pos, pos + length, implicit, depth)
            elif found is not None and tag in TAGS:
                found[tag] = (vr, bytes(self.buf[pos : pos + length]))
            pos += length
        if in_item:
            raise InvalidDataset(f"item without a delimiter ends at offset {pos}")
        return pos

    def header(self, pos: int, end: int, implicit: bool) -> tuple[str, int, int]:
        if implicit:
            return "", self.length(pos + 4), pos + 8
        vr_bytes = bytes(self.buf[pos + 4 : pos + 6])
        if not (vr_bytes.isalpha() and vr_bytes.isupper()):
            raise InvalidDataset(f"invalid value representation {vr_bytes!r} at offset {pos + 4}")
        if vr_bytes in _LONG_VRS:
            if end - pos < 12:
                raise InvalidDataset(f"truncated element header at offset {pos}")
            return vr_bytes.decode(), self.length(pos + 8), pos + 12
        (length,) = struct.unpack(self.u16, self.buf[pos + 6 : pos + 8])
        return vr_bytes.decode(), int(length), pos + 8

    def undefined(
        self, tag: int, vr: str, pos: int, end: int, *, implicit: bool, depth: int
    ) -> int:
        if vr in ("OB", "OW"):
            return self.fragments(pos, end)
        if vr not in ("SQ", "UN", ""):
            raise InvalidDataset(f"undefined length on {_name(tag)} {vr} at offset {pos}")
        # UN of undefined length holds an implicit VR sequence (PS3.5 6.2.2).
        return self.items(pos, end, implicit or vr == "UN", depth)

    def items(self, pos: int, end: int, implicit: bool, depth: int) -> int:
        """Walk the items of a sequence; its defined `end` or a sequence delimiter ends it."""
        while pos < end:
            if end - pos < 8:
                raise InvalidDataset(f"truncated item header at offset {pos}")
            tag, length = self.tag(pos), self.length(pos + 4)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise InvalidDataset(f"expected an item, found {_name(tag)} at offset {pos - 8}")
            if length == _UNDEFINED:
                pos = self.elements(pos, end, implicit, depth + 1, None, in_item=True)
                continue
            if length > end - pos:
                raise InvalidDataset(f"item claims {length} bytes but {end - pos} remain at {pos}")
            self.elements(pos, pos + length, implicit, depth + 1, None)
            pos += length
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated pixel data: defined-length items up to a sequence delimiter."""
        while True:
            if end - pos < 8:
                raise InvalidDataset(f"encapsulated pixel data is truncated at offset {pos}")
            tag, length = self.tag(pos), self.length(pos + 4)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED or length > end - pos:
                raise InvalidDataset(f"broken pixel data fragment at offset {pos - 8}")
            pos += length


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _known_sequence(tag: int) -> bool:
    """In implicit VR only the data dictionary tells a defined-length sequence apart."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


_IDENTITY: Final = ("sop_class_uid", "sop_instance_uid", "study_uid", "series_uid")
"""The UIDs that say which instance a data set is, and where it is stored."""


def _header(found: dict[int, tuple[str, bytes]], *, little: bool) -> Header:
    charset = found.get(0x00080005)
    encodings = _encodings(*charset) if charset else ["iso8859"]
    values: dict[str, str] = {}
    for tag, (vr, raw) in found.items():
        name = TAGS[tag]
        if name in _IDENTITY and vr not in ("", "UI", "UN"):
            # Stored as bytes, it would name another instance to every reader that goes
            # by its VR (pydicom reads an AT as tags).
            raise InvalidDataset(f"{name_of(name)} has VR {vr}, not UI")
        kind = vr or dictionary_VR(tag)
        if kind == "US":
            # Binary; a value of the wrong length is left out rather than guessed at.
            if len(raw) == 2:
                values[name] = str(struct.unpack("<H" if little else ">H", raw)[0])
            continue
        text = decode_bytes(raw, encodings, {0x5C, 0x3D, 0x5E}) if kind in _TEXT_VRS else _text(raw)
        values[name] = text.rstrip("\x00 ").lstrip(" ")
    uids = {}
    for name in _IDENTITY:
        value = values.pop(name, "")
        if not value:
            raise InvalidDataset(f"{name_of(name)} is missing")
        if not valid_uid(value):
            raise InvalidDataset(f"{name_of(name)} is not a valid UID")
        uids[name] = value
    return Header(values=values, **uids)


def _encodings(vr: str, charset: bytes) -> list[str]:
    """Python codecs for a Specific Character Set, or `InvalidDataset` where pydicom
    could not read the stored file: pydicom falls back to the default for a term it does
    not know, but its codec lookup raises on one holding a NUL, and a value of another VR
    (a number) makes its reader raise."""
    if vr not in ("", "CS", "UN"):  # readers take the dictionary's VR for UN
        raise InvalidDataset(f"SpecificCharacterSet (0008,0005) has VR {vr}, not CS")
    try:
        return convert_encodings([v.strip() for v in _text(charset).split("\\")])
    except ValueError:
        raise InvalidDataset("SpecificCharacterSet (0008,0005) is not valid") from None


def _text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace")


def name_of(field_name: str) -> str:
    """The DICOM keyword of a header field, for messages."""
    return {
        "sop_class_uid": "SOPClassUID (0008,0016)",
        "sop_instance_uid": "SOPInstanceUID (0008,0018)",
        "study_uid": "StudyInstanceUID (0020,000D)",
        "series_uid": "SeriesInstanceUID (0020,000E)",
    }.get(field_name, field_name)
