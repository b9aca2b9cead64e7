"""Encryption at rest: the AES-256-GCM envelope, its keyring, rotation and rewrap, and the
tier that seals what it stores."""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telerad.runtime.store import envelope
from telerad.runtime.store.envelope import (
    HEADER,
    SEGMENT,
    TAG,
    EnvelopeError,
    Keyring,
    Opened,
    Rewrap,
    Sealer,
    add_key,
    open_file,
    rewrap,
    seal,
)
from telerad.runtime.store.files import DiskTier


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    add_key(directory, "k1")
    return directory


def opened(data: bytes, keyring: Keyring) -> Opened:
    return Opened(io.BytesIO(data), len(data), keyring, "object")


def _opened_sample() -> tuple[bytes, Opened]:
    import tempfile  # noqa: PLC0415

    directory = Path(tempfile.mkdtemp()) / "keys"
    add_key(directory, "k1")
    keyring = Keyring(directory)
    plain = os.urandom(3 * SEGMENT + 40)
    return plain, opened(seal(keyring, plain), keyring)


PLAIN, OPENED = _opened_sample()


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from([0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 7]),
    pieces=st.integers(min_value=1, max_value=200_000),
)
def test_what_is_sealed_in_pieces_opens_to_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory, size: int, pieces: int
) -> None:
    directory = tmp_path_factory.mktemp("keys")
    add_key(directory, "k1")
    keyring = Keyring(directory)
    data = os.urandom(size)
    sealer = Sealer(keyring)
    out = bytearray(sealer.header)
    for start in range(0, size, pieces):
        out += sealer.update(data[start : start + pieces])
    out += sealer.final()
    assert len(out) == HEADER + size + TAG * max(1, -(-size // SEGMENT))
    found = opened(bytes(out), keyring)
    assert found.size == size
    assert found.read() == data


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 3 * SEGMENT + 50), length=st.integers(0, 2 * SEGMENT + 10))
def test_any_slice_of_an_opened_object_is_that_slice_of_its_plaintext(
    start: int, length: int
) -> None:
    assert OPENED[start : start + length] == PLAIN[start : start + length]


def test_the_sealed_bytes_hold_no_run_of_the_plaintext(keys: Path) -> None:
    data = b"DOE^JANE " * 20_000
    sealed = seal(Keyring(keys), data)
    assert b"DOE^JANE" not in sealed


def test_any_altered_byte_fails_to_open(keys: Path) -> None:
    keyring = Keyring(keys)
    sealed = seal(keyring, os.urandom(2 * SEGMENT + 100))
    # The key slot, the first segment, its tag, the last segment.
    for at in (envelope._PREFIX.size + 60, HEADER + 5, HEADER + SEGMENT + 3, len(sealed) - 1):
        altered = bytearray(sealed)
        altered[at] ^= 0x01
        with pytest.raises(EnvelopeError):
            opened(bytes(altered), keyring).read()


@pytest.mark.parametrize("cut", [1, TAG, SEGMENT + TAG, SEGMENT + TAG + 1])
def test_a_truncated_object_fails_to_open(keys: Path, cut: int) -> None:
    keyring = Keyring(keys)
    sealed = seal(keyring, os.urandom(2 * SEGMENT + 100))
    with pytest.raises(EnvelopeError):
        opened(sealed[:-cut], keyring).read()


def test_segments_in_another_order_fail_to_open(keys: Path) -> None:
    keyring = Keyring(keys)
    sealed = seal(keyring, os.urandom(3 * SEGMENT))
    stored = SEGMENT + TAG
    first, second = HEADER, HEADER + stored
    swapped = (
        sealed[:first]
        + sealed[second : second + stored]
        + sealed[first:second]
        + sealed[second + stored :]
    )
    with pytest.raises(EnvelopeError, match="segment 0"):
        opened(swapped, keyring).read()


def test_the_wrong_key_fails_loudly_and_serves_nothing(keys: Path, tmp_path: Path) -> None:
    sealed = seal(Keyring(keys), b"pixel data")
    impostor = tmp_path / "impostor"
    add_key(impostor, "k1")  # the same id, another key
    with pytest.raises(EnvelopeError, match="does not open its data key"):
        opened(sealed, Keyring(impostor))
    other = tmp_path / "other"
    add_key(other, "k9")
    with pytest.raises(EnvelopeError, match="'k1' is not in the keyring"):
        opened(sealed, Keyring(other))


def test_a_plain_file_is_not_taken_for_a_sealed_one(keys: Path) -> None:
    with pytest.raises(EnvelopeError, match="not a sealed object"):
        opened(b"\0" * 128 + b"DICM" + b"\0" * 200, Keyring(keys))


def test_a_new_current_key_is_used_without_a_new_keyring(keys: Path) -> None:
    keyring = Keyring(keys)
    old = seal(keyring, b"before")
    add_key(keys, "k2")
    new = seal(keyring, b"after")
    assert opened(new, keyring).slot.key_id == "k2"
    assert opened(old, keyring).slot.key_id == "k1"
    assert opened(old, keyring).read() == b"before"


def test_rewrap_moves_an_object_to_the_current_key_without_touching_its_segments(
    keys: Path, tmp_path: Path
) -> None:
    keyring = Keyring(keys)
    path = tmp_path / "object"
    data = os.urandom(SEGMENT + 10)
    path.write_bytes(seal(keyring, data))
    before = path.read_bytes()
    add_key(keys, "k2")
    assert rewrap(path, keyring) == Rewrap.DONE
    assert rewrap(path, keyring) == Rewrap.CURRENT  # a rerun finds it done
    after = path.read_bytes()
    assert after[HEADER:] == before[HEADER:]
    (keys / "k1").unlink()  # the old key retired: the object opens with the new one
    source, found = open_file(path, Keyring(keys))
    with source:
        assert found.slot.key_id == "k2"
        assert found.read() == data


def test_a_rewrap_torn_by_a_crash_leaves_the_old_slot_in_use(keys: Path, tmp_path: Path) -> None:
    keyring = Keyring(keys)
    path = tmp_path / "object"
    path.write_bytes(seal(keyring, b"x" * 1000))
    add_key(keys, "k2")
    rewrap(path, keyring)
    # A crash while the next rewrap wrote slot 0 again: half of it new, half old.
    add_key(keys, "k3")
    raw = bytearray(path.read_bytes())
    slot0 = envelope._PREFIX.size
    raw[slot0 : slot0 + 20] = os.urandom(20)
    path.write_bytes(bytes(raw))
    source, found = open_file(path, keyring)
    with source:
        assert found.slot.key_id == "k2"  # slot 1, whole
        assert found.read() == b"x" * 1000
    assert rewrap(path, keyring) == Rewrap.DONE  # the rerun finishes it
    source, found = open_file(path, keyring)
    with source:
        assert found.slot.key_id == "k3"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no current file"),
        (lambda d: (d / "current").write_text("k7\n"), "names 'k7', which it lacks"),
        (lambda d: (d / "k1").write_text("not base64!\n"), "is not base64"),
        (lambda d: (d / "k1").write_text("AAAA\n"), "holds 3 bytes"),
    ],
)
def test_a_broken_keyring_is_refused_with_what_is_wrong(
    tmp_path: Path, setup: object, message: str
) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    if message != "no current file":
        add_key(directory, "k1")
    assert callable(setup)
    setup(directory)
    with pytest.raises(EnvelopeError, match=message):
        Keyring(directory)


def test_an_encrypted_tier_seals_as_it_receives_and_reads_back_plain(
    keys: Path, tmp_path: Path
) -> None:
    tier = DiskTier("hot", tmp_path / "hot", Keyring(keys))
    data = b"PATIENT^NAME" + os.urandom(3 * SEGMENT) + b"TAIL"
    staged = tier.receive()
    for start in range(0, len(data), 1000):
        staged.write(data[start : start + 1000])
    with staged.plaintext(12) as plain:
        # Opened where it is read, a segment at a time: the data set check's view.
        assert len(plain) == len(data) - 12
        assert plain[0 : len(plain)] == data[12:]
        assert plain[SEGMENT - 20 : SEGMENT + 20] == data[SEGMENT - 8 : SEGMENT + 32]
    assert b"".join(staged.chunks(12)) == data[12:]
    relative = PurePosixPath("studies/1.2/1.2.3/1.2.3.4.dcm")
    version, name = tier.claim(staged, [(1, relative)])
    tier.settle(staged)
    assert (version, name) == (1, relative)
    raw = (tmp_path / "hot" / relative).read_bytes()
    assert b"PATIENT^NAME" not in raw
    assert data[100:164] not in raw
    assert tier.read(relative) == data
    assert b"".join(tier.chunks(relative)) == data
    tier.write(PurePosixPath("studies/1.2/copy.dcm"), tier.chunks(relative))
    assert tier.read(PurePosixPath("studies/1.2/copy.dcm")) == data
