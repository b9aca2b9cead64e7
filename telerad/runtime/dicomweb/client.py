"""A STOW-RS client: sends files or in-memory Part 10 objects to a DICOMweb server as one
multipart/related request, streamed, and reads its answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from telerad.runtime.dicomweb import multipart
from telerad.runtime.dicomweb.media import DICOM, DICOM_JSON

CHUNK = 1 << 20


class StowError(Exception):
    """The server did not answer as STOW-RS says; the message has its status."""


@dataclass(frozen=True, slots=True)
class StowReport:
    status: int
    stored: list[str] = field(default_factory=list)
    """SOP Instance UIDs the server stored."""
    failed: list[tuple[str, int]] = field(default_factory=list)
    """(SOP Instance UID, FailureReason) of those it refused."""
    warnings: list[tuple[str, int]] = field(default_factory=list)


async def _body(boundary: str, items: Sequence[Path | bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield multipart.part_head(boundary, DICOM)
        if isinstance(item, bytes):
            yield item
        else:
            with item.open("rb") as source:
                while chunk := source.read(CHUNK):
                    yield chunk
        yield b"\r\n"
    yield multipart.closing(boundary)


async def store(
    session: aiohttp.ClientSession,
    base_url: str,
    items: Sequence[Path | bytes],
    *,
    study_uid: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> StowReport:
    """POST the items to `{base_url}/studies[/{study_uid}]`, byte for byte."""
    boundary = multipart.new_boundary()
    url = base_url.rstrip("/") + "/studies" + (f"/{study_uid}" if study_uid else "")
    # The length is known from the sizes, so no chunked encoding, which not every server
    # takes on a request.
    length = len(multipart.closing(boundary)) + sum(
        len(multipart.part_head(boundary, DICOM)) + _size(item) + 2 for item in items
    )
    request_headers = {
        **(headers or {}),
        "Content-Type": multipart.content_type(boundary, DICOM),
        "Content-Length": str(length),
        "Accept": DICOM_JSON,
    }
    async with session.post(url, data=_body(boundary, items), headers=request_headers) as answer:
        await answer.read()
        if answer.status not in (200, 202, 409):
            # The body is not quoted: an error page may echo what was sent.
            raise StowError(f"{url} answered {answer.status} {answer.reason}")
        try:
            body = await answer.json(content_type=None)
        except ValueError:
            raise StowError(f"{url} answered {answer.status} without DICOM JSON") from None
    if not isinstance(body, dict):
        raise StowError(f"{url} answered {answer.status} with JSON that is not a data set")
    return StowReport(
        status=answer.status,
        stored=[_uid(item) for item in _items(body, "00081199")],
        failed=[(_uid(item), _reason(item, "00081197")) for item in _items(body, "00081198")],
        warnings=[
            (_uid(item), _reason(item, "00081196"))
            for item in _items(body, "00081199")
            if "00081196" in item
        ],
    )


def _size(item: Path | bytes) -> int:
    return len(item) if isinstance(item, bytes) else item.stat().st_size


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = body.get(tag, {}).get("Value", [])
    return [item for item in value if isinstance(item, dict)]


def _uid(item: dict[str, Any]) -> str:
    values = item.get("00081155", {}).get("Value", [""])
    return str(values[0]) if values else ""


def _reason(item: dict[str, Any], tag: str) -> int:
    values = item.get(tag, {}).get("Value", [0])
    return int(values[0]) if values else 0
