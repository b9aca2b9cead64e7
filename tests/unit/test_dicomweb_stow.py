"""STOW-RS: splitting Part 10 parts (real files, hand-made meta, every refusal, and
hypothesis for arbitrary damage), the response data set and its HTTP status, and the client
against a real aiohttp server on 127.0.0.1 that reads the multipart body the way servers do.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from telerad.runtime.dataset import DEFLATED_LE, EXPLICIT_LE, StoreStatus
from telerad.runtime.dicomweb import client, stow

CT = Path(str(get_testdata_file("CT_small.dcm")))
BIG_ENDIAN = Path(str(get_testdata_file("MR_small_bigendian.dcm")))
JPEG2000 = Path(str(get_testdata_file("JPEG2000.dcm")))
DEFLATED = Path(str(get_testdata_file("image_dfl.dcm")))
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
GROUP_LENGTH_VALUE = 140  # offset of (0002,0000)'s value: preamble, DICM, 8-byte header


# -- building parts by hand --------------------------------------------------------------
def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(uid: str, pad: bytes) -> bytes:
    raw = uid.encode()
    return raw + pad if len(raw) % 2 else raw


def part10(
    transfer_syntax: str = EXPLICIT_LE,
    sop_class: str = CT_CLASS,
    sop_instance: str = "1.2.3.4",
    *,
    group_length: bool = True,
    pad: bytes = b"\x00",
    leave_out: tuple[int, ...] = (),
    data_set: bytes = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 26) + _padded(CT_CLASS, b"\x00"),
) -> bytes:
    """A Part 10 file, by default with a one-element explicit VR little endian data set."""
    elements = [
        (0x0001, b"OB", b"\x00\x01"),
        (0x0002, b"UI", _padded(sop_class, pad)),
        (0x0003, b"UI", _padded(sop_instance, pad)),
        (0x0010, b"UI", _padded(transfer_syntax, pad)),
        (0x0012, b"UI", _padded("1.2.3.999", pad)),
    ]
    meta = b"".join(_meta_element(*e) for e in elements if e[0] not in leave_out)
    if group_length:
        meta = _meta_element(0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    return b"\x00" * 128 + b"DICM" + meta + data_set


def _meta_length(path: Path) -> int:
    """Where pydicom says the data set of a file starts."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return 132 + 12 + int(meta.FileMetaInformationGroupLength)


# -- split: files that are right -----------------------------------------------------------
@pytest.mark.parametrize("path", [CT, BIG_ENDIAN, JPEG2000, DEFLATED], ids=lambda p: p.name)
def test_split_reads_real_files_like_pydicom(path: Path) -> None:
    raw = path.read_bytes()
    part = stow.split(raw)
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    assert part.transfer_syntax == meta.TransferSyntaxUID
    assert part.sop_class_uid == meta.MediaStorageSOPClassUID
    assert part.sop_instance_uid == meta.MediaStorageSOPInstanceUID
    assert part.offset == _meta_length(path)


def test_split_takes_what_a_request_body_is_read_into() -> None:
    raw = CT.read_bytes()
    expected = stow.split(raw)
    assert stow.split(bytearray(raw)) == expected
    assert stow.split(memoryview(raw)) == expected


def test_split_data_set_decodes_where_it_says() -> None:
    raw = BIG_ENDIAN.read_bytes()
    part = stow.split(raw)
    data_set = pydicom.dcmread(
        io.BytesIO(raw[part.offset :]), force=True, stop_before_pixels=True
    )  # a bare data set: pydicom guesses its syntax from the first tag
    assert data_set.SOPInstanceUID == part.sop_instance_uid


def test_split_without_group_length_written_by_pydicom() -> None:
    ds = pydicom.dcmread(CT)
    del ds.file_meta.FileMetaInformationGroupLength
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False)
    raw = out.getvalue()
    assert raw[132:134] == b"\x02\x00" and raw[134:136] != b"\x00\x00"  # truly without it
    part = stow.split(raw)
    assert part.sop_instance_uid == ds.SOPInstanceUID
    assert part.offset == _meta_length(CT) - 12


def test_split_without_group_length_by_hand() -> None:
    with_length = part10()
    without = part10(group_length=False)
    assert len(without) == len(with_length) - 12
    assert stow.split(without).offset == stow.split(with_length).offset - 12
    assert without[stow.split(without).offset :] == with_length[stow.split(with_length).offset :]


@pytest.mark.parametrize("pad", [b"\x00", b" "])
def test_split_strips_uid_padding(pad: bytes) -> None:
    part = stow.split(part10(sop_instance="1.2.3.45", pad=pad))  # odd lengths get padded
    assert part.sop_instance_uid == "1.2.3.45"
    assert part.sop_class_uid == CT_CLASS
    assert part.transfer_syntax == EXPLICIT_LE


@pytest.mark.parametrize("delta", [-6, 6, 1000])
def test_split_tolerates_a_stale_group_length(delta: int) -> None:
    raw = bytearray(CT.read_bytes())
    (length,) = struct.unpack_from("<I", raw, GROUP_LENGTH_VALUE)
    struct.pack_into("<I", raw, GROUP_LENGTH_VALUE, length + delta)
    assert stow.split(raw).offset == _meta_length(CT)


def test_split_of_a_deflated_file_stops_at_the_group_length() -> None:
    # Deflated bytes that happen to start like a group 0002 tag are not read as one.
    with_length = part10(DEFLATED_LE, data_set=b"\x02\x00\x12\x34\x9a\xbc\xde\xf0" * 4)
    assert stow.split(with_length).offset == len(with_length) - 32


def test_split_of_a_deflated_file_trusts_only_a_consistent_group_length() -> None:
    raw = bytearray(DEFLATED.read_bytes())
    (length,) = struct.unpack_from("<I", raw, GROUP_LENGTH_VALUE)
    struct.pack_into("<I", raw, GROUP_LENGTH_VALUE, length - 6)
    with pytest.raises(stow.InvalidPart, match="only the group length can tell"):
        stow.split(raw)


# -- split: every refusal ------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 64, 128, 131])
def test_split_refuses_a_part_too_short(size: int) -> None:
    with pytest.raises(stow.InvalidPart, match=f"has {size} bytes, fewer than"):
        stow.split(CT.read_bytes()[:size])


def test_split_refuses_a_bare_data_set_and_says_so() -> None:
    raw = CT.read_bytes()
    bare = raw[stow.split(raw).offset :]
    with pytest.raises(stow.InvalidPart, match=r"no DICM prefix at offset 128.*not bare data sets"):
        stow.split(bare)


def test_split_refuses_every_cut_inside_the_meta() -> None:
    raw = CT.read_bytes()
    end = stow.split(raw).offset
    for cut in range(132, end + 1):
        with pytest.raises(stow.InvalidPart, match=r"runs past the end|has no data set") as info:
            stow.split(raw[:cut])
        assert str(cut) in str(info.value)  # where it ended, or the length it has


# part10(group_length=False) has its meta elements at 132 (OB, 14 bytes), 146 (34),
# 180 (16), 196 (28) and 224 (18); its data set starts at 242.
@pytest.mark.parametrize(
    ("cut", "element"), [(135, 132), (140, 132), (150, 146), (179, 146), (190, 180), (230, 224)]
)
def test_split_says_the_offset_of_the_truncated_element(cut: int, element: int) -> None:
    raw = part10(group_length=False)
    assert stow.split(raw).offset == 242
    with pytest.raises(stow.InvalidPart, match=f"at offset {element} runs past the end"):
        stow.split(raw[:cut])


def test_split_refuses_a_meta_element_without_explicit_vr() -> None:
    raw = bytearray(CT.read_bytes())
    raw[148:150] = b"\x00\x00"  # the VR of (0002,0001), the element after the group length
    with pytest.raises(stow.InvalidPart, match=r"\(0002,0001\) at offset 144 has no explicit VR"):
        stow.split(raw)


@pytest.mark.parametrize(
    ("element", "label"),
    [
        (0x0010, "TransferSyntaxUID"),
        (0x0002, "MediaStorageSOPClassUID"),
        (0x0003, "MediaStorageSOPInstanceUID"),
    ],
)
def test_split_refuses_a_meta_without_a_uid(element: int, label: str) -> None:
    with pytest.raises(stow.InvalidPart, match=f"has no {label}"):
        stow.split(part10(leave_out=(element,)))


@pytest.mark.parametrize(
    ("uids", "element", "label"),
    [
        ({"transfer_syntax": "1.2.840.10008.1.2.01"}, 0x0010, "TransferSyntaxUID"),
        ({"sop_class": "1.2.840.10008.5.1.4.1.1.2.x"}, 0x0002, "MediaStorageSOPClassUID"),
        ({"sop_instance": "1.2.3.4/../../etc"}, 0x0003, "MediaStorageSOPInstanceUID"),
        ({"sop_instance": "1." + "2" * 70}, 0x0003, "MediaStorageSOPInstanceUID"),
    ],
)
def test_split_refuses_an_invalid_uid_without_quoting_it(
    uids: dict[str, str], element: int, label: str
) -> None:
    raw = part10(**uids)
    with pytest.raises(stow.InvalidPart, match=rf"{label} \(0002,{element:04X}\)") as info:
        stow.split(raw)
    (value,) = uids.values()
    assert value not in str(info.value)
    found = re.search(r"at offset ([0-9]+) is not a valid UID", str(info.value))
    assert found is not None
    offset = int(found[1])
    assert raw[offset : offset + 4] == struct.pack("<HH", 0x0002, element)


def test_split_refuses_a_part_that_is_only_file_meta() -> None:
    raw = CT.read_bytes()
    end = stow.split(raw).offset
    for extra in range(8):
        with pytest.raises(stow.InvalidPart, match=f"{extra} bytes after its file meta"):
            stow.split(raw[: end + extra])


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=420),
    noise=st.binary(max_size=64),
    flips=st.lists(st.tuples(st.integers(128, 419), st.integers(0, 255)), max_size=6),
)
def test_split_never_fails_but_with_invalid_part(
    cut: int, noise: bytes, flips: list[tuple[int, int]]
) -> None:
    damaged = bytearray(CT.read_bytes()[:420])
    for offset, value in flips:
        damaged[offset] = value
    for candidate in (bytes(damaged[:cut]), bytes(damaged[:cut]) + noise, noise, bytes(damaged)):
        try:
            part = stow.split(candidate)
        except stow.InvalidPart:
            continue
        # What comes through is usable: a data set follows, and the UIDs are clean.
        assert 132 < part.offset < len(candidate)
        assert all(
            uid and "\x00" not in uid and " " not in uid
            for uid in (part.transfer_syntax, part.sop_class_uid, part.sop_instance_uid)
        )


# -- response ------------------------------------------------------------------------------
OK = stow.Stored(CT_CLASS, "1.2.3.4", "http://g/studies/1/series/2/instances/1.2.3.4")
WARNED = stow.Stored(CT_CLASS, "1.2.3.5", "http://g/studies/1/series/2/instances/1.2.3.5", 0xB007)
BAD = stow.refused(StoreStatus.STUDY_MISMATCH, "another study", CT_CLASS, "1.2.3.6")
UNREADABLE = stow.refused(StoreStatus.CANNOT_UNDERSTAND, "not DICOM")
STUDY = "http://g/studies/1"


@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        ([OK], 200),
        ([OK, OK], 200),
        ([OK, BAD], 202),
        ([WARNED], 202),
        ([OK, WARNED], 202),
        ([BAD], 409),
        ([BAD, UNREADABLE], 409),
    ],
)
def test_response_status(outcomes: list[stow.Outcome], status: int) -> None:
    assert stow.response(outcomes, STUDY)[0] == status


def test_response_of_no_instances_is_never_a_success() -> None:
    with pytest.raises(ValueError, match="at least one"):
        stow.response([], STUDY)


def test_response_data_set_has_the_tags_and_vrs_of_ps3_18() -> None:
    _, body = stow.response([OK, WARNED, BAD, UNREADABLE], STUDY)
    assert list(body) == ["00081190", "00081198", "00081199"]
    assert body["00081190"] == {"vr": "UR", "Value": [STUDY]}
    failed = body["00081198"]
    assert failed["vr"] == "SQ"
    assert failed["Value"][0] == {
        "00081150": {"vr": "UI", "Value": [CT_CLASS]},
        "00081155": {"vr": "UI", "Value": ["1.2.3.6"]},
        "00081197": {"vr": "US", "Value": [0xA900]},
    }
    # One item per failed instance, even one whose UIDs could not be read.
    assert failed["Value"][1] == {
        "00081150": {"vr": "UI"},
        "00081155": {"vr": "UI"},
        "00081197": {"vr": "US", "Value": [0xC000]},
    }
    stored = body["00081199"]
    assert stored["vr"] == "SQ"
    assert stored["Value"][0] == {
        "00081150": {"vr": "UI", "Value": [CT_CLASS]},
        "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00081190": {"vr": "UR", "Value": [OK.retrieve_url]},
    }
    assert stored["Value"][1]["00081196"] == {"vr": "US", "Value": [0xB007]}


def test_response_parses_back_with_pydicom() -> None:
    _, body = stow.response([OK, WARNED, BAD, UNREADABLE], STUDY)
    ds = Dataset.from_json(json.dumps(body))
    assert ds.RetrieveURL == STUDY
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.2.3.4", "1.2.3.5"]
    assert [i.RetrieveURL for i in ds.ReferencedSOPSequence] == [
        OK.retrieve_url,
        WARNED.retrieve_url,
    ]
    assert "WarningReason" not in ds.ReferencedSOPSequence[0]
    assert ds.ReferencedSOPSequence[1].WarningReason == 0xB007
    assert [i.FailureReason for i in ds.FailedSOPSequence] == [0xA900, 0xC000]
    assert ds.FailedSOPSequence[1].ReferencedSOPInstanceUID in ("", None)
    for element in (ds["RetrieveURL"], ds.FailedSOPSequence[0]["FailureReason"]):
        assert dictionary_VR(element.tag) == element.VR


def test_response_without_stored_instances_has_no_study_url() -> None:
    status, body = stow.response([BAD], STUDY)
    assert status == 409
    assert "00081190" not in body and "00081199" not in body
    assert "00081190" not in stow.response([OK], None)[1]


def test_statuses_are_the_ps3_4_and_ps3_18_codes() -> None:
    assert {r.name: r.value for r in StoreStatus} == {
        "SUCCESS": 0x0000,
        "PROCESSING_FAILURE": 0x0110,
        "OUT_OF_RESOURCES": 0xA700,
        "STUDY_MISMATCH": 0xA900,
        "CANNOT_UNDERSTAND": 0xC000,
        "TRANSFER_SYNTAX_NOT_SUPPORTED": 0xC122,
        "COERCED": 0xB000,
        "CLASS_MISMATCH": 0xB007,
    }


# -- the client against a real server ------------------------------------------------------
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    part_types: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)


Answer = Callable[[Received], Awaitable[web.Response]]


def _item(sop_instance: str, tag: str | None = None, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT_CLASS
    item.ReferencedSOPInstanceUID = sop_instance
    if tag is not None:
        setattr(item, tag, reason)
    return item


def _dicom_json(status: int, ds: Dataset) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(ds.to_json_dict()), content_type="application/dicom+json"
    )


def _uids(received: Received) -> list[str]:
    return [
        str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID)
        for p in received.parts
    ]


async def _all_stored(received: Received) -> web.Response:
    ds = Dataset()
    ds.ReferencedSOPSequence = [_item(uid) for uid in _uids(received)]
    return _dicom_json(200, ds)


def _exchange(
    files: list[Path | bytes], answer: Answer, keep: bool = True, **kwargs: Any
) -> tuple[client.StowReport, Received]:
    """Send `files` to a server on 127.0.0.1 that answers with `answer`."""
    seen: list[Received] = []

    async def handle(request: web.Request) -> web.Response:
        received = Received(request.path, dict(request.headers))
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            received.part_types.append(part.headers.get("Content-Type", ""))
            digest = hashlib.sha256()
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                digest.update(chunk)
                if keep:
                    data += chunk
            received.digests.append(digest.hexdigest())
            received.parts.append(bytes(data))
        seen.append(received)
        return await answer(received)

    async def run() -> client.StowReport:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/dicom-web/studies", handle)
        app.router.add_post("/dicom-web/studies/{study}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession() as session:
                return await client.store(
                    session, f"http://127.0.0.1:{port}/dicom-web/", files, **kwargs
                )
        finally:
            await runner.cleanup()

    report = asyncio.run(run())
    (received,) = seen
    return report, received


def test_client_sends_each_file_byte_for_byte() -> None:
    in_memory = JPEG2000.read_bytes()
    files: list[Path | bytes] = [CT, BIG_ENDIAN, in_memory, DEFLATED]
    report, received = _exchange(files, _all_stored, chunk_size=1000)
    assert received.parts == [
        CT.read_bytes(),
        BIG_ENDIAN.read_bytes(),
        in_memory,
        DEFLATED.read_bytes(),
    ]
    assert received.part_types == ["application/dicom"] * 4
    assert received.path == "/dicom-web/studies"
    assert report.status == 200
    assert report.stored == [
        pydicom.dcmread(p).SOPInstanceUID for p in (CT, BIG_ENDIAN, JPEG2000, DEFLATED)
    ]
    assert report.failed == [] and report.warnings == []


def test_client_request_headers() -> None:
    _, received = _exchange([CT], _all_stored, headers={"Authorization": "Bearer t0ken"})
    content_type = received.headers["Content-Type"]
    assert content_type.startswith("multipart/related;")
    assert 'type="application/dicom"' in content_type
    assert "boundary=" in content_type
    assert received.headers["Accept"] == "application/dicom+json"
    assert received.headers["Authorization"] == "Bearer t0ken"
    # A known length, not chunked: not every server takes a chunked request.
    assert "Transfer-Encoding" not in received.headers
    assert int(received.headers["Content-Length"]) > CT.stat().st_size


def test_client_posts_to_the_study() -> None:
    study = str(pydicom.dcmread(CT).StudyInstanceUID)
    _, received = _exchange([CT], _all_stored, study_uid=study)
    assert received.path == f"/dicom-web/studies/{study}"


def test_client_refuses_a_study_uid_that_is_not_one() -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await client.store(session, "http://127.0.0.1:9", [CT], study_uid="1.2/../3")

    with pytest.raises(ValueError, match="not a valid UID"):
        asyncio.run(run())


async def _nothing_stored(_: Received) -> web.Response:
    return _dicom_json(200, Dataset())


def test_client_streams_without_holding_a_file(tmp_path: Path) -> None:
    size = 16 << 20
    files: list[Path | bytes] = []
    for n in range(3):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(bytes([n]) * size)
        files.append(path)
    tracemalloc.start()
    try:
        _, received = _exchange(
            files,
            _nothing_stored,
            keep=False,
            chunk_size=1 << 16,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received.digests == [hashlib.sha256(bytes([n]) * size).hexdigest() for n in range(3)]
    assert peak < size // 2


def test_client_reads_a_partial_answer() -> None:
    async def answer(received: Received) -> web.Response:
        first, second, third = _uids(received)
        ds = Dataset()
        ds.ReferencedSOPSequence = [_item(first), _item(third, "WarningReason", 0xB007)]
        ds.FailedSOPSequence = [_item(second, "FailureReason", 0xA900)]
        return _dicom_json(202, ds)

    report, _ = _exchange([CT, BIG_ENDIAN, JPEG2000], answer)
    ct, mr, jpeg = (str(pydicom.dcmread(p).SOPInstanceUID) for p in (CT, BIG_ENDIAN, JPEG2000))
    assert report == client.StowReport(
        status=202, stored=[ct, jpeg], failed=[(mr, 0xA900)], warnings=[(jpeg, 0xB007)]
    )


def test_client_reads_our_own_response() -> None:
    async def answer(received: Received) -> web.Response:
        outcomes: list[stow.Outcome] = [
            stow.refused(StoreStatus.CANNOT_UNDERSTAND, "x", CT_CLASS, uid)
            for uid in _uids(received)
        ]
        outcomes.append(stow.refused(StoreStatus.CANNOT_UNDERSTAND, "not DICOM"))
        status, body = stow.response(outcomes, None)
        return web.json_response(body, status=status, content_type="application/dicom+json")

    report, _ = _exchange([CT], answer)
    assert report.status == 409
    assert report.stored == []
    assert report.failed == [(str(pydicom.dcmread(CT).SOPInstanceUID), 0xC000), ("", 0xC000)]


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (500, "<html><body>Internal error</body></html>", "text/html", "answered 500"),
        (404, "no such path", "text/plain", "answered 404"),
        (200, "<html>ok</html>", "text/html", "answered 200 without a DICOM JSON data set"),
        (202, "[]", "application/dicom+json", "answered 202 without a DICOM JSON data set"),
        (
            200,
            '{"00081199": {"vr": "SQ", "Value": ["x"]}}',
            "application/dicom+json",
            "without a DICOM JSON data set",
        ),
        (
            409,
            '{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": ["x"]}}]}}',
            "application/dicom+json",
            "answered 409 without a DICOM JSON data set",
        ),
    ],
)
def test_client_raises_on_answers_that_are_not_stow_rs(
    status: int, body: str, content_type: str, message: str
) -> None:
    async def answer(_: Received) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    study = str(pydicom.dcmread(CT).StudyInstanceUID)
    with pytest.raises(client.StowError, match=message) as info:
        _exchange([CT], answer, study_uid=study)
    assert info.value.status == status
    assert info.value.body == body[:200]
    # The message goes to logs: it names the server, never the study or the answer.
    assert study not in str(info.value) and body not in str(info.value)


def test_client_keeps_only_the_start_of_a_long_error_answer() -> None:
    async def answer(_: Received) -> web.Response:
        return web.Response(status=503, text="é" * 5000)

    with pytest.raises(client.StowError) as info:
        _exchange([CT], answer)
    assert info.value.body == "é" * 200
