"""multipart/related (RFC 2387) as DICOMweb uses it: reading the request's Content-Type,
and writing a body part by part so a large study streams."""

from __future__ import annotations

import secrets
from email.message import Message


def new_boundary() -> str:
    # 24 random bytes: the chance that they turn up inside pixel data is nil, and with the
    # prefix the boundary stays within RFC 2046's 70 characters (aiohttp enforces it).
    return f"telerad-{secrets.token_hex(24)}"


def content_type(boundary: str, part_type: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_head(boundary: str, part_content_type: str, location: str | None = None) -> bytes:
    """What goes before a part's body; the body is followed by CRLF."""
    lines = [f"--{boundary}", f"Content-Type: {part_content_type}"]
    if location is not None:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


def parse_related(header: str) -> tuple[str, str | None]:
    """(boundary, type parameter) of a multipart/related Content-Type; ValueError says
    what is wrong with it."""
    message = Message()
    message["Content-Type"] = header
    if message.get_content_type() != "multipart/related" or not header.strip():
        given = header.split(";", maxsplit=1)[0].strip() or "absent"
        raise ValueError(f"the body must be multipart/related, not {given}")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("the multipart/related Content-Type has no boundary")
    kind = message.get_param("type")
    return boundary, kind.lower() if isinstance(kind, str) else None
