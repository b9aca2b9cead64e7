"""WADO-RS rendering from a stored Part 10 file: the instance itself (as stored, or in
another uncompressed syntax when asked), its metadata in the DICOM JSON model with bulk
data by reference, frames (native, or compressed as stored), and bulk data values.

Only uncompressed little-endian syntaxes are ever produced by re-encoding: pydicom can do
that faithfully without touching pixel values. Anything that would need a codec is refused
with the stored syntax named, rather than done lossily or slowly behind the client's back;
compressed frames are sent as they are stored, each frame's bytes cut from the
encapsulated pixel data, which is what viewers decode.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID

from telerad.runtime.dataset import DEFLATED_LE, EXPLICIT_LE, IMPLICIT_LE
from telerad.runtime.dicomweb.media import AS_STORED, NotAcceptable

# Re-encoded between one another by pydicom without a codec.
_READABLE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
_WRITABLE = frozenset({IMPLICIT_LE, EXPLICIT_LE})
BULK_THRESHOLD = 1024
"""Binary values longer than this many bytes are sent by reference."""
PIXEL_DATA = 0x7FE00010
TRANSFER_SYNTAX = "00020010"
AVAILABLE_SYNTAX = "00083002"


class NotFound(Exception):
    """The instance has no such frame or element."""


def check(stored: str, wanted: Sequence[str]) -> str:
    """The transfer syntax an instance stored in `stored` is sent in."""
    for syntax in wanted:
        if syntax in (AS_STORED, stored):
            return stored
        if stored in _READABLE and syntax in _WRITABLE:
            return syntax
    raise NotAcceptable(
        f"an instance stored in {stored} ({UID(stored).name}) can be sent as stored"
        + (" or in Implicit/Explicit VR Little Endian" if stored in _READABLE else "")
        + f", not in {', '.join(wanted)}"
    )


def render(part10: bytes, stored: str, wanted: Sequence[str]) -> tuple[bytes, str]:
    """The Part 10 bytes to send and their transfer syntax: the stored bytes untouched
    unless the client asked for a syntax they are not in."""
    syntax = check(stored, wanted)
    if syntax == stored:
        return part10, stored
    ds = pydicom.dcmread(io.BytesIO(part10))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), syntax


def _read(part10: bytes) -> Dataset:
    # Values are sliced from the buffer, pixel data included, but never decoded.
    return pydicom.dcmread(io.BytesIO(part10))


def _paths(ds: Dataset, prefix: str = "") -> dict[int, str]:
    """id() of every element -> its path for a bulk data URI: tags and item indexes."""
    paths: dict[int, str] = {}
    for elem in ds:
        path = f"{prefix}{elem.tag:08X}"
        paths[id(elem)] = path
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                paths.update(_paths(item, f"{path}/{index}/"))
    return paths


def metadata(part10: bytes, instance_url: str) -> dict[str, Any]:
    """The data set as DICOM JSON; binary values over `BULK_THRESHOLD` bytes (pixel data
    always) become a BulkDataURI under `{instance_url}/bulkdata/`. The stored transfer
    syntax is given as TransferSyntaxUID and AvailableTransferSyntaxUID: a viewer picks
    its decoder (and what to ask frames in) by it."""
    ds = _read(part10)
    paths = _paths(ds)
    referred: dict[str, DataElement] = {}

    def uri(elem: DataElement) -> str:
        link = f"{instance_url}/bulkdata/{paths[id(elem)]}"
        referred[link] = elem
        return link

    # pydicom takes its threshold as a base64 length (1024 refers a value over 768 bytes)
    # and no threshold means 1024 raw bytes: every binary value is offered as a reference,
    # and those of 1 KiB or less are put back inline.
    body: dict[str, Any] = ds.to_json_dict(0, uri)
    _inline_small(body, referred)
    pixels = ds.get(PIXEL_DATA)
    if pixels is not None and "BulkDataURI" not in body.get(f"{PIXEL_DATA:08X}", {}):
        # Small images too: clients look for pixel data by reference.
        body[f"{PIXEL_DATA:08X}"] = {"vr": pixels.VR, "BulkDataURI": uri(pixels)}
    syntax = {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    body[TRANSFER_SYNTAX] = syntax
    body[AVAILABLE_SYNTAX] = dict(syntax)
    return dict(sorted(body.items()))


def _inline_small(body: dict[str, Any], referred: dict[str, DataElement]) -> None:
    for attribute in body.values():
        if attribute["vr"] == "SQ":
            for item in attribute.get("Value", ()):
                _inline_small(item, referred)
        elem = referred.get(attribute.get("BulkDataURI", ""))
        if elem is not None and elem.tag != PIXEL_DATA and len(elem.value) <= BULK_THRESHOLD:
            del attribute["BulkDataURI"]
            attribute["InlineBinary"] = base64.b64encode(elem.value).decode()


def bulkdata(part10: bytes, path: str) -> bytes:
    """The raw value of the element at `path` (`7FE00010`, or `00880200/0/7FE00010` inside
    a sequence item)."""
    top = ds = _read(part10)
    pieces = path.split("/")
    try:
        for seq, index in zip(pieces[:-2:2], pieces[1:-1:2], strict=True):
            ds = ds[int(seq, 16)].value[int(index)]
        elem = ds[int(pieces[-1], 16)]
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise NotFound(f"the instance has no bulk data at {path}") from None
    if elem.VR == "SQ" or not isinstance(elem.value, bytes):
        raise NotFound(f"the element at {path} is not bulk data")
    if elem.tag == PIXEL_DATA and top.file_meta.TransferSyntaxUID.is_compressed:
        raise NotAcceptable("compressed pixel data is sent only within the instance")
    return elem.value


def frame_syntax(stored: str) -> str:
    """The transfer syntax frames of an instance stored in `stored` are in: native pixel
    data of any little-endian syntax is that of Explicit VR Little Endian; encapsulated
    pixel data keeps its own."""
    syntax = UID(stored)
    if syntax.is_encapsulated:
        return stored
    if not syntax.is_little_endian:
        raise NotAcceptable(
            f"frames are not served from big-endian pixel data ({stored}): retrieve the"
            " instance instead"
        )
    return EXPLICIT_LE


def frames(part10: bytes, numbers: Sequence[int]) -> list[bytes]:
    """Frames, 1-based, in the order asked: native ones cut from the pixel data,
    encapsulated ones as stored (the fragments of each frame joined)."""
    ds = _read(part10)
    syntax = frame_syntax(ds.file_meta.TransferSyntaxUID)
    if PIXEL_DATA not in ds:
        raise NotFound("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    for number in numbers:
        if not 1 <= number <= count:
            raise NotFound(f"frame {number} does not exist; the instance has {count}")
    if syntax != EXPLICIT_LE:
        return _encapsulated(ds, numbers, count)
    bits = int(ds.get("BitsAllocated", 0))
    pixels = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
    if pixels * bits % 8:
        raise NotAcceptable("frames of bit-packed pixel data that do not end on a byte")
    size = pixels * bits // 8
    value: bytes = ds.PixelData
    if size == 0 or len(value) < size * count:
        raise NotFound("the pixel data is shorter than its attributes say")
    return [value[(n - 1) * size : n * size] for n in numbers]


def _encapsulated(ds: Dataset, numbers: Sequence[int], count: int) -> list[bytes]:
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return [
            get_frame(ds.PixelData, n - 1, number_of_frames=count, extended_offsets=offsets)
            for n in numbers
        ]
    except (ValueError, KeyError) as exc:
        raise NotFound(f"the encapsulated pixel data does not hold {count} frames: {exc}") from None
