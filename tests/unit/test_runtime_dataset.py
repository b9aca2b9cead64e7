"""The strict data set walker: it proves well-formedness or says what is wrong, and
nothing it is given makes it fail in any other way."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from telerad.runtime.dataset import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    InvalidDataset,
    parse,
    valid_uid,
)
from telerad.runtime.store.files import instance_path

CT = Path(str(get_testdata_file("CT_small.dcm")))


def body(name: str) -> bytes:
    """The encoded data set of a pydicom sample, as the file holds it."""
    raw = Path(str(get_testdata_file(name))).read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


BODY = body("CT_small.dcm")


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_implicit.dcm", IMPLICIT_LE),
        ("MR_small.dcm", EXPLICIT_LE),
        ("MR_small_bigendian.dcm", EXPLICIT_BE),
    ],
)
def test_header_of_each_encoding(name: str, syntax: str) -> None:
    header = parse(body(name), syntax)
    ds = pydicom.dcmread(get_testdata_file(name))
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.get("modality") == "MR"
    assert header.get("patient_name") == str(ds.PatientName)


def test_deflated() -> None:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = deflater.compress(BODY) + deflater.flush()
    assert parse(data, DEFLATED_LE).sop_instance_uid == pydicom.dcmread(CT).SOPInstanceUID


def test_cuts_are_noticed() -> None:
    """Every cut inside an element is an error; the few that fall between top-level
    elements are the only ones that may parse."""
    cuts = range(1, len(BODY) - 1, 97)
    refused = 0
    for cut in cuts:
        try:
            parse(BODY[:cut], EXPLICIT_LE)
        except InvalidDataset:
            refused += 1
    assert refused >= len(cuts) - 2


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(min_value=0, max_value=len(BODY) - 1),
    garbage=st.binary(min_size=1, max_size=16),
    syntax=st.sampled_from([IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED_LE]),
)
def test_garbled_input_is_a_clear_error_or_a_header(
    position: int, garbage: bytes, syntax: str
) -> None:
    data = BODY[:position] + garbage + BODY[position + len(garbage) :]
    try:
        header = parse(data, syntax)
    except InvalidDataset as exc:
        message = str(exc)
        assert message
    else:
        assert valid_uid(header.sop_instance_uid)


@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    for syntax in (IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE):
        with contextlib.suppress(InvalidDataset):
            parse(data, syntax)


@given(st.text(max_size=80))
def test_valid_uids_are_safe_path_components(text: str) -> None:
    if valid_uid(text):
        assert "/" not in text and ".." not in text and text not in (".", "")
        assert instance_path(text, text, text, 1).parts[1] == text
    else:
        with pytest.raises(ValueError, match="not a valid UID"):
            instance_path(text, "1.2", "1.2", 1)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "2.25.1234", "0.1"])
def test_good_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "1", "1..2", "1.02", ".1.2", "1.2.", "1.2/3", "a.b", "1." * 33]
)
def test_bad_uids(uid: str) -> None:
    assert not valid_uid(uid)


@pytest.mark.parametrize(("vr", "refused"), [(b"AT", True), (b"US", True), (b"UN", False)])
def test_an_identity_uid_under_another_vr_is_refused(vr: bytes, refused: bool) -> None:
    """Found by the DIMSE fuzzer: a SOP Instance UID sent as AT was stored, and pydicom
    then read it as a list of tags, another instance than the one catalogued. UN is what
    a sender that does not know the VR writes; readers take the dictionary's."""
    ds = pydicom.dcmread(CT)
    tag = b"\x08\x00\x18\x00"
    at = BODY.index(tag + b"UI")
    mutated = BODY[:at] + tag + vr + BODY[at + 6 :]
    if vr == b"UN":  # a long VR: two reserved bytes, then a 4-byte length
        length = int.from_bytes(BODY[at + 6 : at + 8], "little")
        mutated = BODY[:at] + tag + vr + b"\0\0" + length.to_bytes(4, "little")
        mutated += BODY[at + 8 :]
    if refused:
        with pytest.raises(InvalidDataset, match=r"SOPInstanceUID \(0008,0018\) has VR"):
            parse(mutated, EXPLICIT_LE)
    else:
        assert parse(mutated, EXPLICIT_LE).sop_instance_uid == ds.SOPInstanceUID
