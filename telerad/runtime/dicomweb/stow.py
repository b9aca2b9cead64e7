"""STOW-RS (PS3.18 10.5) apart from HTTP: splitting a Part 10 part into its file meta and
data set, and the response that lists what was stored and what was not, and why."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from telerad.runtime.dataset import DEFLATED_LE, StoreStatus, valid_uid

_PREAMBLE: Final = 128
_META: Final = _PREAMBLE + 4
_HEADER: Final = 8
"""The shortest element header; a data set has at least one."""
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UIDS: Final = {
    0x0010: "TransferSyntaxUID (0002,0010)",
    0x0002: "MediaStorageSOPClassUID (0002,0002)",
    0x0003: "MediaStorageSOPInstanceUID (0002,0003)",
}


class InvalidPart(ValueError):
    """The part is not a DICOM Part 10 file; the message says where it went wrong."""


class _Short(InvalidPart):
    """The part ends inside its file meta, or right after it."""


@dataclass(frozen=True, slots=True)
class Part10:
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    offset: int
    """Where the data set starts."""


@dataclass(frozen=True, slots=True)
class Stored:
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str
    warning: int | None = None
    """A WarningReason (0xB000, 0xB007), when stored with one."""


@dataclass(frozen=True, slots=True)
class Refused:
    sop_class_uid: str
    """Empty, as is the instance UID, when the part could not be read that far."""
    sop_instance_uid: str
    reason: StoreStatus
    comment: str
    """Why, for logs; not part of the response."""


Outcome = Stored | Refused


def refused(
    reason: StoreStatus, comment: str, sop_class: str = "", sop_instance: str = ""
) -> Refused:
    return Refused(sop_class, sop_instance, reason, comment)


def split(part: bytes | bytearray | memoryview, *, whole: bool = True) -> Part10:
    """The file meta of a Part 10 file (PS3.10 7.1) and where its data set starts; `part`
    may be only its first bytes (not `whole`), as long as they hold the file meta.

    The group 0002 elements themselves say where the meta ends, so a group length left
    stale by a tool that edited the meta does not matter. It decides only for a deflated
    data set, whose first bytes are not a tag."""
    try:
        return _split(part)
    except _Short:
        if whole:
            raise
        raise InvalidPart(
            f"the file meta does not end within the first {len(part)} bytes of the part"
        ) from None


def _split(part: bytes | bytearray | memoryview) -> Part10:
    size = len(part)
    if size < _META:
        raise _Short(
            f"the part has {size} bytes, fewer than the 128-byte preamble and DICM prefix"
            " of a DICOM Part 10 file"
        )
    if part[_PREAMBLE:_META] != b"DICM":
        raise InvalidPart(
            "no DICM prefix at offset 128: not a DICOM Part 10 file. STOW-RS takes"
            " application/dicom parts with their file meta information, not bare data sets"
        )
    end, group_end, found = _walk(part)
    if group_end is not None and group_end > size:
        raise _Short(
            f"the file meta runs past the end of the part: its group length says it ends at"
            f" offset {group_end}, the part has {size} bytes"
        )
    if group_end is not None and end != group_end and _deflated(found):
        raise InvalidPart(
            f"the file meta's group length says it ends at offset {group_end}, its elements"
            f" at offset {end}; with a deflated data set only the group length can tell"
        )
    if size - end < _HEADER:
        raise _Short(
            f"the part ends at offset {size}, {size - end} bytes after its file meta:"
            " it has no data set"
        )
    transfer_syntax, sop_class, sop_instance = (_required(found, element, end) for element in _UIDS)
    return Part10(transfer_syntax, sop_class, sop_instance, offset=end)


def _walk(
    part: bytes | bytearray | memoryview,
) -> tuple[int, int | None, dict[int, tuple[str, int]]]:
    """Where the group 0002 elements end, where the group length says they end, and the
    UIDs among them with their offsets."""
    pos = _META
    group_end: int | None = None
    found: dict[int, tuple[str, int]] = {}
    while pos + 2 <= len(part):
        if group_end is not None and pos >= group_end and _deflated(found):
            break
        if struct.unpack_from("<H", part, pos)[0] != 0x0002:
            break
        element, start, length = _element_header(part, pos)
        end = start + length
        if end > len(part):
            raise _Short(
                f"file meta element (0002,{element:04X}) at offset {pos} runs past the end"
                f" of the part ({length} bytes from offset {start}, the part has {len(part)})"
            )
        if element == 0x0000 and pos == _META and length == 4:
            group_end = end + int(struct.unpack_from("<I", part, start)[0])
        elif element in _UIDS:
            value = bytes(part[start:end]).decode("ascii", "replace").rstrip("\x00 ")
            found[element] = (value, pos)
        pos = end
    return pos, group_end, found


def _required(found: dict[int, tuple[str, int]], element: int, end: int) -> str:
    value, offset = found.get(element, ("", 0))
    if not value:
        raise InvalidPart(f"the file meta (offsets {_META} to {end}) has no {_UIDS[element]}")
    if not valid_uid(value):
        raise InvalidPart(f"the file meta's {_UIDS[element]} at offset {offset} is not a valid UID")
    return value


def _truncated(pos: int, header: int, size: int) -> InvalidPart:
    return _Short(
        f"file meta element at offset {pos} runs past the end of the part"
        f" (its header alone has {header} bytes, the part has {size})"
    )


def _deflated(found: dict[int, tuple[str, int]]) -> bool:
    return found.get(0x0010, ("", 0))[0] == DEFLATED_LE


def _element_header(part: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int]:
    """(element, value offset, value length) of the explicit VR little endian group 0002
    element at `pos`."""
    if pos + _HEADER > len(part):
        raise _truncated(pos, _HEADER, len(part))
    element = int(struct.unpack_from("<H", part, pos + 2)[0])
    vr = bytes(part[pos + 4 : pos + 6])
    if not (vr.isalpha() and vr.isupper()):
        raise InvalidPart(
            f"file meta element (0002,{element:04X}) at offset {pos} has no explicit VR"
            " (the file meta is always explicit VR little endian)"
        )
    if vr not in _LONG_VRS:
        return element, pos + 8, int(struct.unpack_from("<H", part, pos + 6)[0])
    if pos + 12 > len(part):
        raise _truncated(pos, 12, len(part))
    return element, pos + 12, int(struct.unpack_from("<I", part, pos + 8)[0])


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _ui(value: str) -> dict[str, Any]:
    # An instance whose part could not be read has no UIDs: the attribute is there, empty.
    return _element("UI", value) if value else _element("UI")


def response(outcomes: list[Outcome], study_retrieve_url: str | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the response data set (PS3.18 10.5.3) in the DICOM JSON model:
    200 all stored, 202 some refused or warned, 409 none stored.

    A request without parts has nothing to report on: ValueError, so that it can never
    come out as a 200; the handler answers it with 400."""
    if not outcomes:
        raise ValueError("a STOW-RS response needs at least one instance")
    stored = [o for o in outcomes if isinstance(o, Stored)]
    failed = [o for o in outcomes if isinstance(o, Refused)]
    body: dict[str, Any] = {}
    if stored and study_retrieve_url is not None:
        body["00081190"] = _element("UR", study_retrieve_url)
    if failed:
        body["00081198"] = _element(
            "SQ",
            *(
                {
                    "00081150": _ui(o.sop_class_uid),
                    "00081155": _ui(o.sop_instance_uid),
                    "00081197": _element("US", int(o.reason)),
                }
                for o in failed
            ),
        )
    if stored:
        items = []
        for o in stored:
            item = {
                "00081150": _ui(o.sop_class_uid),
                "00081155": _ui(o.sop_instance_uid),
                "00081190": _element("UR", o.retrieve_url),
            }
            if o.warning is not None:
                item["00081196"] = _element("US", o.warning)
            items.append(item)
        body["00081199"] = _element("SQ", *items)
    if not stored:
        return 409, body
    warned = any(o.warning is not None for o in stored)
    return (202 if failed or warned else 200), body
