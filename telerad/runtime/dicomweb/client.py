"""A DICOMweb client for what telerad itself sends: STOW-RS of files or in-memory Part 10
objects as one streamed multipart/related request, and WADO-RS of a whole study."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from telerad.runtime.dataset import valid_uid
from telerad.runtime.dicomweb import multipart
from telerad.runtime.dicomweb.media import DICOM, DICOM_JSON

CHUNK = 1 << 20
_QUOTED = 200


class Part(Protocol):
    """A Part 10 file held elsewhere (a tier's stored instance): its size and its bytes,
    read in a thread a chunk at a time."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


class RetrieveError(Exception):
    """A WADO-RS retrieve did not give the study's instances; `status` is the answer's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def retrieve(
    session: aiohttp.ClientSession,
    base_url: str,
    study_uid: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> list[bytes]:
    """GET `{base_url}/studies/{study_uid}`: every instance of the study as stored (any
    transfer syntax), as Part 10 bytes."""
    if not valid_uid(study_uid):
        raise ValueError("study_uid is not a valid UID")
    url = f"{base_url.rstrip('/')}/studies/{study_uid}"
    accept = f'multipart/related; type="{DICOM}"; transfer-syntax=*'
    async with session.get(url, headers={**(headers or {}), "Accept": accept}) as answer:
        where = f"WADO-RS from {base_url}"
        if answer.status != 200:
            raise RetrieveError(f"{where}: answered {answer.status} {answer.reason}", answer.status)
        reader = aiohttp.MultipartReader.from_response(answer)
        parts = []
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, aiohttp.BodyPartReader):
                raise RetrieveError(f"{where}: a nested multipart in the answer", answer.status)
            parts.append(bytes(await part.read()))
    return parts


class StowError(Exception):
    """The server did not answer as STOW-RS says. The message has the status; the start
    of the answer is kept apart in `body`, because a server's error page may echo what it
    was sent, and the message goes to logs."""

    def __init__(self, message: str, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        """The first 200 characters of the answer."""


@dataclass(frozen=True, slots=True)
class StowReport:
    status: int
    stored: list[str] = field(default_factory=list)
    """SOP Instance UIDs the server stored."""
    failed: list[tuple[str, int]] = field(default_factory=list)
    """(SOP Instance UID, FailureReason) of those it refused; the UID may be empty."""
    warnings: list[tuple[str, int]] = field(default_factory=list)
    """(SOP Instance UID, WarningReason) of those it stored with a warning."""


async def store(
    session: aiohttp.ClientSession,
    base_url: str,
    files: Sequence[Path | bytes | Part],
    *,
    study_uid: str | None = None,
    headers: Mapping[str, str] | None = None,
    chunk_size: int = CHUNK,
) -> StowReport:
    """POST Part 10 files (paths, objects in memory, or stored ones) to
    `{base_url}/studies[/{study_uid}]`, byte for byte. 200, 202 and 409 answers are
    reports; anything else is a StowError, as are answers that are not a DICOM JSON data
    set."""
    if study_uid is not None and not valid_uid(study_uid):
        raise ValueError("study_uid is not a valid UID")
    boundary = multipart.new_boundary()
    url = base_url.rstrip("/") + "/studies" + (f"/{study_uid}" if study_uid else "")
    # The length is known from the sizes, so no chunked encoding, which not every server
    # takes on a request.
    sizes = await asyncio.to_thread(lambda: [_size(item) for item in files])
    length = len(multipart.closing(boundary)) + sum(
        len(multipart.part_head(boundary, DICOM)) + size + 2 for size in sizes
    )
    request_headers = {
        **(headers or {}),
        "Content-Type": multipart.content_type(boundary, DICOM),
        "Content-Length": str(length),
        "Accept": DICOM_JSON,
    }
    body = _body(boundary, files, chunk_size)
    async with session.post(url, data=body, headers=request_headers) as answer:
        status = answer.status
        # The URL may name a study, so the messages name only the server.
        where = f"STOW-RS to {base_url}"
        if status not in (200, 202, 409):
            start = await _start(answer)
            raise StowError(f"{where}: answered {status} {answer.reason}", status, start)
        raw = await answer.read()
    try:
        return _report(status, json.loads(raw))
    except ValueError:
        raise StowError(
            f"{where}: answered {status} without a DICOM JSON data set",
            status,
            raw[: _QUOTED * 4].decode("utf-8", "replace")[:_QUOTED],
        ) from None


async def _start(answer: aiohttp.ClientResponse) -> str:
    """The first characters of an answer, without reading all of a large one."""
    start = b""
    # Up to four bytes a character in UTF-8.
    while len(start) < _QUOTED * 4:
        chunk = await answer.content.read(_QUOTED * 4 - len(start))
        if not chunk:
            break
        start += chunk
    return start.decode("utf-8", "replace")[:_QUOTED]


async def _body(
    boundary: str, files: Sequence[Path | bytes | Part], chunk_size: int
) -> AsyncIterator[bytes]:
    for item in files:
        yield multipart.part_head(boundary, DICOM)
        if isinstance(item, bytes):
            yield item
        elif not isinstance(item, Path):
            chunks = item.chunks()
            while chunk := await asyncio.to_thread(next, chunks, b""):
                yield chunk
        else:
            # Reads go to a thread: the tiers may be network storage, and the event loop
            # serves other requests meanwhile.
            source = await asyncio.to_thread(item.open, "rb")
            try:
                while chunk := await asyncio.to_thread(source.read, chunk_size):
                    yield chunk
            finally:
                source.close()
        yield b"\r\n"
    yield multipart.closing(boundary)


def _size(item: Path | bytes | Part) -> int:
    if isinstance(item, bytes):
        return len(item)
    return item.stat().st_size if isinstance(item, Path) else item.size


def _report(status: int, body: object) -> StowReport:
    """The instances a response data set (PS3.18 10.5.3) lists; ValueError when it is not
    one."""
    if not isinstance(body, dict):
        raise ValueError("not a data set")
    stored = _sequence(body, "00081199")
    return StowReport(
        status=status,
        stored=[_uid(item) for item in stored],
        failed=[(_uid(item), _reason(item, "00081197")) for item in _sequence(body, "00081198")],
        warnings=[(_uid(item), _reason(item, "00081196")) for item in stored if "00081196" in item],
    )


def _sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    items = _values(body, tag)
    if not all(isinstance(item, dict) for item in items):
        raise ValueError(f"{tag} is not a sequence")
    return items


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag, {})
    values = element.get("Value", []) if isinstance(element, dict) else None
    if not isinstance(values, list):
        raise ValueError(f"{tag} is not a DICOM JSON element")
    return values


def _uid(item: dict[str, Any]) -> str:
    values = _values(item, "00081155")
    if values and not isinstance(values[0], str):
        raise ValueError("a ReferencedSOPInstanceUID is not a string")
    return str(values[0]) if values else ""


def _reason(item: dict[str, Any], tag: str) -> int:
    """A FailureReason or WarningReason; 0 when the server left it empty."""
    values = _values(item, tag)
    if values and (not isinstance(values[0], int) or isinstance(values[0], bool)):
        raise ValueError(f"{tag} is not a US value")
    return int(values[0]) if values else 0
