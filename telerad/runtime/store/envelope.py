"""Encryption at rest: AES-256-GCM envelopes, one data key per stored object.

Each object gets a fresh 256-bit data key; the key is wrapped (RFC 3394 AES key wrap) by
the site's key encryption key, and the wrapped key and the key's id travel in the object's
header. The bytes are sealed in segments of `SEGMENT` bytes, each its own GCM message
(nonce: the object's random prefix and the segment's number; the last segment says it is
the last), so an object is written as it arrives and read back a segment at a time, and a
reordered, truncated or altered object fails to open instead of reading as something else.

The header has two slots for the wrapped key. `rewrap` writes the slot not in use with a
higher generation and a checksum, so a crash while it writes leaves the other slot whole:
rotating the key encryption key never rewrites an image byte.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

MAGIC = b"TLRDAES1"
SEGMENT = 64 << 10
TAG = 16
KEY_BYTES = 32
_PREFIX = struct.Struct(">8sI8s")  # magic, segment size, nonce prefix
_SLOT = struct.Struct(">IB47s40sI")  # generation, id length, id, wrapped key, crc32
HEADER = _PREFIX.size + 2 * _SLOT.size
_CACHED = 4
"""Segments an `Opened` read piece by piece keeps."""
CURRENT = "current"
"""The keyring file that names the key new objects are wrapped with."""
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,46}$")
"""A key id: a Secret key name, short enough for the header's slot."""


class EnvelopeError(Exception):
    """An object that cannot be opened: not sealed, damaged, or sealed with a key the
    keyring does not hold. Nothing of it is served. The message names no UID."""


@dataclass(frozen=True, slots=True)
class Slot:
    generation: int
    key_id: str
    wrapped: bytes


class Keyring:
    """Key encryption keys from a directory (a mounted Secret): one file per key id holding
    the key as base64 of 32 bytes, and `current` naming the one that wraps new data keys.
    The directory is read again when `current` changes, so a new key becomes current
    without a restart, and the keys it replaced stay to open older objects."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._keys: dict[str, bytes] = {}
        self._current = ""
        self._reload()

    def current(self) -> tuple[str, bytes]:
        self._reload()
        return self._current, self._keys[self._current]

    def key(self, key_id: str) -> bytes:
        found = self._keys.get(key_id)
        if found is None:
            self._reload()
            found = self._keys.get(key_id)
        if found is None:
            raise EnvelopeError(f"key {key_id!r} is not in the keyring at {self.directory}")
        return found

    def _reload(self) -> None:
        marker = self.directory / CURRENT
        try:
            stat = marker.stat()
        except OSError as exc:
            raise EnvelopeError(f"keyring {self.directory}: no {CURRENT} file ({exc})") from None
        seen = (stat.st_mtime_ns, stat.st_ino)
        with self._lock:
            if seen == self._seen:
                return
            current = marker.read_text().strip()
            keys = {
                path.name: _decode_key(path)
                for path in self.directory.iterdir()
                if KEY_ID.match(path.name) and path.name != CURRENT and path.is_file()
            }
            if current not in keys:
                raise EnvelopeError(
                    f"keyring {self.directory}: {CURRENT} names {current!r}, which it lacks"
                )
            self._keys, self._current, self._seen = keys, current, seen


def _decode_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(f"key file {path} is not base64") from None
    if len(key) != KEY_BYTES:
        raise EnvelopeError(f"key file {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


def add_key(directory: Path, key_id: str, *, make_current: bool = True) -> None:
    """Add a new random key encryption key to a keyring directory (readable by its owner
    only), and make it current. What `telerad storage new-key` and the example do; a
    cluster's keyring is a Secret, made the same way."""
    if not KEY_ID.match(key_id) or key_id == CURRENT:
        raise ValueError(f"not a key id: {key_id!r}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / key_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
    if make_current:
        tmp = directory / f".{CURRENT}.{secrets.token_hex(4)}"
        tmp.write_text(key_id + "\n")
        tmp.replace(directory / CURRENT)


def _slot_bytes(slot: Slot) -> bytes:
    raw_id = slot.key_id.encode()
    body = struct.pack(">IB47s40s", slot.generation, len(raw_id), raw_id, slot.wrapped)
    return body + struct.pack(">I", zlib.crc32(body))


def _read_slot(raw: bytes) -> Slot | None:
    generation, id_length, raw_id, wrapped, crc = _SLOT.unpack(raw)
    if generation == 0 or zlib.crc32(raw[:-4]) != crc or id_length > len(raw_id):
        return None  # never written, or torn by a crash while `rewrap` wrote it
    return Slot(generation, raw_id[:id_length].decode(errors="replace"), wrapped)


class Sealer:
    """Seals one object's bytes as they come: `header`, then what `update` and `final`
    return, in that order, make the stored object."""

    def __init__(self, keyring: Keyring) -> None:
        key_id, kek = keyring.current()
        data_key = AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(data_key)
        self._prefix = secrets.token_bytes(8)
        self._index = 0
        self._pending = bytearray()
        slot = _slot_bytes(Slot(1, key_id, aes_key_wrap(kek, data_key)))
        self.header = _PREFIX.pack(MAGIC, SEGMENT, self._prefix) + slot + bytes(_SLOT.size)

    def update(self, data: bytes | memoryview) -> bytes:
        self._pending += data
        if len(self._pending) <= SEGMENT:
            return b""
        # A full segment is sealed only once more follows it: the last one is marked.
        whole = (len(self._pending) - 1) // SEGMENT * SEGMENT
        with memoryview(self._pending) as view:
            out = b"".join(
                self._seal(view[start : start + SEGMENT], last=False)
                for start in range(0, whole, SEGMENT)
            )
        del self._pending[:whole]
        return out

    def final(self) -> bytes:
        out = self._seal(self._pending, last=True)
        self._pending = bytearray()
        return out

    def _seal(self, plain: bytes | bytearray | memoryview, *, last: bool) -> bytes:
        nonce = self._prefix + struct.pack(">I", self._index)
        self._index += 1
        return self._aead.encrypt(nonce, plain, _aad(SEGMENT, last=last))


def _aad(segment: int, *, last: bool) -> bytes:
    return MAGIC + struct.pack(">IB", segment, last)


def seal(keyring: Keyring, data: bytes) -> bytes:
    """One object sealed whole (what tests and small objects use)."""
    sealer = Sealer(keyring)
    return sealer.header + sealer.update(data) + sealer.final()


class Source(Protocol):
    """What a sealed object is opened from: an open file, or a `Buffer`."""

    def read(self, size: int, /) -> bytes | memoryview: ...

    def seek(self, offset: int, /) -> int: ...


class Buffer:
    """A sealed object already in memory (an S3 GET's body), read without a copy."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._at = 0

    def read(self, size: int, /) -> memoryview:
        piece = self._data[self._at : self._at + size]
        self._at += len(piece)
        return piece

    def seek(self, offset: int, /) -> int:
        self._at = offset
        return offset


class Opened:
    """A sealed object opened with the keyring: its plaintext size and its bytes, a
    segment at a time. Every failure is an EnvelopeError that names the object."""

    def __init__(self, source: Source, size: int, keyring: Keyring, name: str) -> None:
        self.name = name
        self._source = source
        head = bytes(source.read(HEADER))
        if len(head) < HEADER or not head.startswith(MAGIC):
            raise EnvelopeError(f"{name} is not a sealed object")
        _, segment, self._prefix = _PREFIX.unpack_from(head)
        self._segment: int = segment
        slots = [_read_slot(head[_PREFIX.size + i * _SLOT.size :][: _SLOT.size]) for i in (0, 1)]
        written = [(s.generation, i, s) for i, s in enumerate(slots) if s is not None]
        if not written or self._segment <= 0:
            raise EnvelopeError(f"{name}: its header is damaged")
        _, self.slot_index, self.slot = max(written, key=lambda w: w[:2])
        kek = keyring.key(self.slot.key_id)
        try:
            self._aead = AESGCM(aes_key_unwrap(kek, self.slot.wrapped))
        except InvalidUnwrap:
            raise EnvelopeError(
                f"{name}: key {self.slot.key_id!r} of the keyring does not open its data key"
            ) from None
        body = size - HEADER
        stored = self._segment + TAG
        self._count = max(1, -(-body // stored))
        self.size: int = body - self._count * TAG
        if self.size < 0:
            raise EnvelopeError(f"{name} is truncated")
        self._cache: dict[int, bytes] = {}

    def chunks(self) -> Iterator[bytes]:
        """The plaintext, segment by segment (`SEGMENT` bytes each, the last shorter)."""
        self._source.seek(HEADER)
        stored = self._segment + TAG
        for index in range(self._count):
            sealed = self._source.read(stored)
            yield self._open(index, sealed)

    def _open(self, index: int, sealed: bytes | memoryview) -> bytes:
        last = index == self._count - 1
        if len(sealed) < TAG or (not last and len(sealed) != self._segment + TAG):
            raise EnvelopeError(f"{self.name} is truncated")
        nonce = self._prefix + struct.pack(">I", index)
        try:
            return self._aead.decrypt(nonce, sealed, _aad(self._segment, last=last))
        except InvalidTag:
            raise EnvelopeError(
                f"{self.name}: segment {index} does not authenticate (damaged or altered)"
            ) from None

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, piece: slice, /) -> bytes:
        """The plaintext bytes of `piece` (no step), opening only the segments they lie in
        (the last few kept): the data set check reads a sealed file this way."""
        start, stop, _ = piece.indices(self.size)
        if start >= stop:
            return b""
        first, last = start // self._segment, (stop - 1) // self._segment
        offset = first * self._segment
        if first == last:  # the common case: an element's header or a short value
            return self._segment_at(first)[start - offset : stop - offset]
        out = b"".join(self._segment_at(i) for i in range(first, last + 1))
        return out[start - offset : stop - offset]

    def _segment_at(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is None:
            stored = self._segment + TAG
            self._source.seek(HEADER + index * stored)
            cached = self._open(index, self._source.read(stored))
            if len(self._cache) >= _CACHED:
                del self._cache[next(iter(self._cache))]
            self._cache[index] = cached
        return cached


def open_file(
    path: Path, keyring: Keyring, name: str = "a stored object"
) -> tuple[BinaryIO, Opened]:
    """A sealed file opened; the caller closes the file. `name` is what errors call it:
    never its path, which holds UIDs."""
    source = path.open("rb")
    try:
        return source, Opened(source, os.fstat(source.fileno()).st_size, keyring, name)
    except BaseException:
        source.close()
        raise


class Rewrap(StrEnum):
    """What `rewrap` did to one stored object."""

    DONE = "rewrapped"
    """Its data key is now wrapped by the current key."""
    CURRENT = "current"
    """It already was."""
    ARCHIVED = "archived"
    """In an archive storage class: it cannot be read, so it keeps its key until it is
    restored (keep that key in the keyring meanwhile)."""


def new_slot(opened: Opened, keyring: Keyring) -> tuple[int, bytes] | None:
    """Where in an object, and what, to write so that the keyring's current key wraps its
    data key: the header slot not in use, one generation up. None when it already does."""
    key_id, kek = keyring.current()
    if opened.slot.key_id == key_id:
        return None
    data_key = aes_key_unwrap(keyring.key(opened.slot.key_id), opened.slot.wrapped)
    slot = Slot(opened.slot.generation + 1, key_id, aes_key_wrap(kek, data_key))
    return _PREFIX.size + (1 - opened.slot_index) * _SLOT.size, _slot_bytes(slot)


def rewrap(path: Path, keyring: Keyring, name: str = "a stored object") -> Rewrap:
    """Wrap a sealed file's data key with the keyring's current key, in the header slot
    not in use, and flush it. Crash-safe: until the new slot is whole on disk (its
    checksum), readers use the old one."""
    source, opened = open_file(path, keyring, name)
    with source:
        change = new_slot(opened, keyring)
    if change is None:
        return Rewrap.CURRENT
    at, slot = change
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, slot, at)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Rewrap.DONE
