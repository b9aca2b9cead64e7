"""STOW-RS (PS3.18 10.5) apart from HTTP: splitting a Part 10 part into its file meta and
data set, and the response that lists what was stored and what was not, and why."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from telerad.runtime.dataset import valid_uid

_PREAMBLE = 128
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_META = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax"}


class InvalidPart(ValueError):
    """The part is not a DICOM Part 10 file; the message says where it went wrong."""


class Reason(IntEnum):
    """FailureReason and WarningReason values (PS3.18 10.5.3, borrowed from PS3.4 B.2.3)."""

    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    STUDY_MISMATCH = 0xA900
    """The instance's study is not the one in the URL. PS3.18 leaves the code to the
    server: an 0xA9xx "does not match" error (dcm4chee uses its own 0xC409)."""
    CANNOT_UNDERSTAND = 0xC000
    COERCED = 0xB000
    CLASS_MISMATCH = 0xB007


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


@dataclass(frozen=True, slots=True)
class Refused:
    sop_class_uid: str
    sop_instance_uid: str
    reason: Reason
    comment: str


Outcome = Stored | Refused


def refused(reason: Reason, comment: str, sop_class: str = "", sop_instance: str = "") -> Refused:
    return Refused(sop_class, sop_instance, reason, comment)


def split(part: bytes | bytearray) -> Part10:
    """The file meta of a Part 10 file (PS3.10 7.1) and where its data set starts."""
    if len(part) < _PREAMBLE + 4 or part[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise InvalidPart(
            "not a DICOM Part 10 file (no DICM prefix at offset 128); STOW-RS takes"
            " application/dicom parts with their file meta information"
        )
    pos = _PREAMBLE + 4
    found: dict[str, str] = {}
    while pos + 8 <= len(part):
        group, element = struct.unpack_from("<HH", part, pos)
        if group != 0x0002:
            break
        vr = bytes(part[pos + 4 : pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise InvalidPart(f"file meta element at offset {pos} has no explicit VR")
        if vr in _LONG_VRS:
            if pos + 12 > len(part):
                raise InvalidPart(f"file meta is truncated at offset {pos}")
            (length,) = struct.unpack_from("<I", part, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", part, pos + 6)
            start = pos + 8
        end = start + length
        if end > len(part):
            raise InvalidPart(f"file meta element at offset {pos} runs past the end")
        if element in _META:
            found[_META[element]] = part[start:end].decode("ascii", "replace").rstrip("\x00 ")
        pos = end
    for name, label in (
        ("transfer_syntax", "TransferSyntaxUID (0002,0010)"),
        ("sop_class_uid", "MediaStorageSOPClassUID (0002,0002)"),
        ("sop_instance_uid", "MediaStorageSOPInstanceUID (0002,0003)"),
    ):
        value = found.get(name, "")
        if not value:
            raise InvalidPart(f"the file meta has no {label}")
        if not valid_uid(value):
            raise InvalidPart(f"the file meta's {label} is not a valid UID")
    return Part10(offset=pos, **found)


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def response(outcomes: list[Outcome], study_url: str | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the response data set (PS3.18 10.5.3) in the DICOM JSON model:
    200 all stored, 202 some refused or warned, 409 none stored."""
    if not outcomes:
        raise ValueError("a STOW-RS response needs at least one instance")
    stored = [o for o in outcomes if isinstance(o, Stored)]
    failed = [o for o in outcomes if isinstance(o, Refused)]
    body: dict[str, Any] = {}
    if stored and study_url is not None:
        body["00081190"] = _element("UR", study_url)
    if failed:
        body["00081198"] = _element(
            "SQ",
            *(
                {
                    "00081150": _element("UI", *([o.sop_class_uid] if o.sop_class_uid else [])),
                    "00081155": _element(
                        "UI", *([o.sop_instance_uid] if o.sop_instance_uid else [])
                    ),
                    "00081197": _element("US", int(o.reason)),
                }
                for o in failed
            ),
        )
    if stored:
        items = []
        for o in stored:
            item = {
                "00081150": _element("UI", o.sop_class_uid),
                "00081155": _element("UI", o.sop_instance_uid),
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
