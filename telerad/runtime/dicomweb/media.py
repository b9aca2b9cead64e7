"""Content negotiation of WADO-RS and QIDO-RS (PS3.18 8.7): which of the media types a
client accepts the gateway can answer with.

One deliberate choice: PS3.18 says `application/dicom` without a `transfer-syntax`
parameter means Explicit VR Little Endian. This gateway keeps every instance exactly as it
was received and serves it that way when the parameter is absent or `*`, as Orthanc and
dcm4chee do, so nothing is decoded or re-encoded unless a client names a syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

AS_STORED = "*"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
# PS3.18 table 8.7.3-5: the media types of compressed frames and the transfer syntaxes
# each may carry, its default first.
FRAME_TYPES: Final[dict[str, tuple[str, ...]]] = {
    "image/jpeg": (
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
    ),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": (
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    ),
}
# Names older clients (and dicomweb-client) still use.
_FRAME_ALIASES: Final = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_TOKEN = re.compile(r'\s*([^\s;,="]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s;,]*))?\s*')


class NotAcceptable(Exception):
    """None of the media types the client accepts can be produced; says what can."""


@dataclass(frozen=True, slots=True)
class MediaRange:
    media_type: str
    """`type/subtype`, lower case."""
    params: dict[str, str] = field(default_factory=dict)
    """Parameters other than q, names lower case, values unquoted."""
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        kind, sub = self.media_type.split("/", 1)
        want_kind, want_sub = media_type.split("/", 1)
        return kind in ("*", want_kind) and sub in ("*", want_sub)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, most preferred first (stable for equal q); ranges
    with q=0 are left out. An absent or empty header accepts anything."""
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[tuple[int, MediaRange]] = []
    for index, item in enumerate(_split(header, ",")):
        pieces = _split(item, ";")
        if not pieces:
            continue
        media_type = pieces[0].strip().lower()
        if media_type.count("/") != 1:
            continue  # not a media range; RFC 9110 lets the server ignore it
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            match = _TOKEN.fullmatch(piece)
            if match is None:
                continue
            name, value = match.group(1).lower(), _unquote(match.group(2) or "")
            if name == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
            else:
                params[name] = value
        if q > 0:
            ranges.append((index, MediaRange(media_type, params, q)))
    ranges.sort(key=lambda r: (-r[1].q, r[0]))
    return [r for _, r in ranges]


def _split(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            out.append("".join(current))
            current = []
            continue
        current.append(char)
    out.append("".join(current))
    return [piece for piece in out if piece.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _multipart_of(accepted: MediaRange, part_type: str) -> bool:
    """Whether a range accepts a multipart/related body of `part_type` parts (a bare
    `part_type` is taken to mean that too, as most servers do)."""
    if accepted.media_type == part_type:
        return True
    if not accepted.matches("multipart/related"):
        return False
    kind = accepted.params.get("type", "").lower()
    return kind in ("", part_type) or MediaRange(kind or "*/*").matches(part_type)


def dicom_syntaxes(header: str | None) -> tuple[str, ...]:
    """Transfer syntaxes a retrieval of instances may use, most preferred first;
    `AS_STORED` means each instance as it is stored."""
    wanted: list[str] = []
    for accepted in parse_accept(header):
        if _multipart_of(accepted, DICOM):
            syntax = accepted.params.get("transfer-syntax", AS_STORED)
            if syntax not in wanted:
                wanted.append(syntax)
    if not wanted:
        raise NotAcceptable(
            f'instances are sent as multipart/related; type="{DICOM}" (in their stored'
            " transfer syntax, or one named with transfer-syntax=)"
        )
    return tuple(wanted)


def octet_stream(header: str | None) -> None:
    """Check that bulk data may be sent as it is stored in multipart/related
    application/octet-stream parts."""
    for accepted in parse_accept(header):
        if _multipart_of(accepted, OCTET_STREAM) and accepted.params.get(
            "transfer-syntax", AS_STORED
        ) in (AS_STORED, EXPLICIT_LE):
            return
    raise NotAcceptable(
        f'bulk data is sent as multipart/related; type="{OCTET_STREAM}"'
        " (uncompressed, little endian)"
    )


def frames(header: str | None, syntax: str) -> str:
    """The Content-Type of frames whose pixel data is in `syntax` (Explicit VR Little
    Endian for native pixel data), as `<media type>; transfer-syntax=<syntax>`, when the
    client accepts them as they are: frames are never decoded or re-encoded.

    `application/octet-stream` takes native frames by default, any syntax with
    `transfer-syntax=*` (what OHIF asks for) or its own; an image type of table 8.7.3-5
    takes the syntaxes it lists (without the parameter too: the stored form is the only
    one this server has, which PS3.18 8.7.3 allows it to send)."""
    image = next((t for t, syntaxes in FRAME_TYPES.items() if syntax in syntaxes), None)
    names = [OCTET_STREAM]
    if image is not None:
        names += [image, *(alias for alias, name in _FRAME_ALIASES.items() if name == image)]
    for accepted in parse_accept(header):
        asked = accepted.params.get("transfer-syntax")
        for name in names:
            if not _multipart_of(accepted, name):
                continue
            if asked in (AS_STORED, syntax) or (
                asked is None and (name != OCTET_STREAM or syntax == EXPLICIT_LE)
            ):
                return f"{name}; transfer-syntax={syntax}"
    as_image = f' or type="{image}"' if image else ""
    raise NotAcceptable(
        f"the frames are stored in {syntax} and sent as stored: accept multipart/related;"
        f' type="{OCTET_STREAM}"; transfer-syntax=*{as_image}'
    )


def dicom_json(header: str | None) -> str:
    """The media type to answer metadata and searches with."""
    for accepted in parse_accept(header):
        if accepted.matches(DICOM_JSON):
            return DICOM_JSON
        if accepted.media_type == "application/json":
            return "application/json"
    raise NotAcceptable(f"metadata and search results are sent as {DICOM_JSON} only")
