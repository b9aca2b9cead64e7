"""The pure DICOMweb pieces on real DICOM files: content negotiation, multipart framing,
WADO-RS rendering, QIDO-RS parsing; hypothesis for the parsers that read network input.
STOW-RS parts, responses and the client are in test_dicomweb_stow.py."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from telerad.runtime.dataset import EXPLICIT_LE, IMPLICIT_LE
from telerad.runtime.dicomweb import media, multipart, qido, wado
from telerad.runtime.store.search import Kind, Level

CT = Path(str(get_testdata_file("CT_small.dcm")))
MULTIFRAME = Path(str(get_testdata_file("emri_small.dcm")))
JPEG2000 = Path(str(get_testdata_file("JPEG2000.dcm")))
BIG_ENDIAN = Path(str(get_testdata_file("MR_small_bigendian.dcm")))


# -- content negotiation -------------------------------------------------------------
@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, ("*",)),
        ("", ("*",)),
        ("*/*", ("*",)),
        ('multipart/related; type="application/dicom"', ("*",)),
        ("multipart/related; type=application/dicom; transfer-syntax=*", ("*",)),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2;'
            ' q=0.5, multipart/related; type="application/dicom";'
            " transfer-syntax=1.2.840.10008.1.2.1",
            (EXPLICIT_LE, IMPLICIT_LE),
        ),
        ("application/dicom", ("*",)),
        ('image/jpeg, multipart/related; type="application/dicom"; q=0.1', ("*",)),
    ],
)
def test_accept_for_instances(accept: str | None, expected: tuple[str, ...]) -> None:
    assert media.dicom_syntaxes(accept) == expected


@pytest.mark.parametrize(
    "accept",
    [
        "image/jpeg",
        'multipart/related; type="image/jp2"',
        "application/dicom+json",
        'multipart/related; type="application/dicom"; q=0',
    ],
)
def test_accept_that_cannot_be_met_says_what_can(accept: str) -> None:
    with pytest.raises(media.NotAcceptable, match="application/dicom"):
        media.dicom_syntaxes(accept)


def test_accept_for_json_and_octet_streams() -> None:
    assert media.dicom_json("application/dicom+json, application/json") == media.DICOM_JSON
    assert media.dicom_json("application/json") == "application/json"
    assert media.dicom_json(None) == media.DICOM_JSON
    with pytest.raises(media.NotAcceptable):
        media.dicom_json("application/dicom+xml")
    media.octet_stream('multipart/related; type="application/octet-stream"')
    media.octet_stream(
        "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    )
    with pytest.raises(media.NotAcceptable):
        media.octet_stream('multipart/related; type="image/jpeg"')
    with pytest.raises(media.NotAcceptable):
        media.octet_stream(
            'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2'
        )


@settings(max_examples=300)
@given(st.text())
def test_accept_parsing_never_fails_on_junk(header: str) -> None:
    for negotiate in (media.dicom_syntaxes, media.octet_stream, media.dicom_json):
        with contextlib.suppress(media.NotAcceptable):
            negotiate(header)


# -- multipart ------------------------------------------------------------------------
def test_multipart_framing_parses_back() -> None:
    boundary = multipart.new_boundary()
    bodies = [b"\r\n--not-a-boundary\r\n", bytes(range(256)) * 10, b""]
    body = b"".join(
        multipart.part_head(boundary, "application/octet-stream", f"/x/{i}") + b + b"\r\n"
        for i, b in enumerate(bodies)
    ) + multipart.closing(boundary)
    content_type = multipart.content_type(boundary, "application/octet-stream")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = list(message.iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == bodies
    assert [p["Content-Location"] for p in parts] == ["/x/0", "/x/1", "/x/2"]
    assert multipart.parse_related(content_type) == (boundary, "application/octet-stream")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("application/json", "not application/json"),
        ("", "not absent"),
        ("multipart/related; type=application/dicom", "no boundary"),
    ],
)
def test_content_types_refused_with_the_reason(header: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        multipart.parse_related(header)


# -- WADO-RS ---------------------------------------------------------------------------
def test_render_as_stored_is_the_same_bytes() -> None:
    raw = CT.read_bytes()
    body, syntax = wado.render(raw, EXPLICIT_LE, ("*",))
    assert body is raw and syntax == EXPLICIT_LE


def test_render_transcodes_between_uncompressed_syntaxes_only() -> None:
    raw = CT.read_bytes()
    body, syntax = wado.render(raw, EXPLICIT_LE, (IMPLICIT_LE,))
    assert syntax == IMPLICIT_LE
    again = pydicom.dcmread(io.BytesIO(body))
    assert again.file_meta.TransferSyntaxUID == IMPLICIT_LE
    assert again == pydicom.dcmread(CT)
    assert again.file_meta.MediaStorageSOPInstanceUID == pydicom.dcmread(CT).SOPInstanceUID
    jpeg = pydicom.dcmread(JPEG2000).file_meta.TransferSyntaxUID
    with pytest.raises(media.NotAcceptable, match=str(jpeg)):
        wado.render(JPEG2000.read_bytes(), jpeg, (EXPLICIT_LE,))
    # The first acceptable wins: as stored beats a transcode the client liked less.
    assert wado.check(jpeg, (EXPLICIT_LE, "*")) == jpeg


def test_metadata_refers_to_bulk_data_and_is_valid_json() -> None:
    raw = MULTIFRAME.read_bytes()
    body = wado.metadata(raw, "http://g/studies/1/series/2/instances/3")
    pixel = body["7FE00010"]
    assert pixel == {
        "vr": "OW",
        "BulkDataURI": "http://g/studies/1/series/2/instances/3/bulkdata/7FE00010",
    }
    text = json.dumps(body)
    ds = Dataset.from_json({k: v for k, v in body.items() if "BulkDataURI" not in v})
    source = pydicom.dcmread(MULTIFRAME)
    assert ds.SOPInstanceUID == source.SOPInstanceUID and ds.Rows == source.Rows
    assert len(text) < 20_000  # no inline pixel data
    stored = {"vr": "UI", "Value": [str(source.file_meta.TransferSyntaxUID)]}
    assert body["00020010"] == body["00083002"] == stored
    assert list(body) == sorted(body)


def test_bulkdata_and_frames_are_the_stored_values() -> None:
    raw = MULTIFRAME.read_bytes()
    source = pydicom.dcmread(MULTIFRAME)
    assert wado.bulkdata(raw, "7FE00010") == source.PixelData
    first, third = wado.frames(raw, [1, 3])
    assert np.array_equal(np.frombuffer(first, "<u2").reshape(64, 64), source.pixel_array[0])
    assert np.array_equal(np.frombuffer(third, "<u2").reshape(64, 64), source.pixel_array[2])
    with pytest.raises(wado.NotFound, match="frame 11"):
        wado.frames(raw, [11])
    with pytest.raises(wado.NotFound):
        wado.bulkdata(raw, "00091001")
    with pytest.raises(wado.NotFound):
        wado.bulkdata(raw, "00100010/0/7FE00010")
    # Compressed frames are the stored codestream, never decoded.
    jpeg = pydicom.dcmread(JPEG2000)
    assert wado.frames(JPEG2000.read_bytes(), [1]) == [
        get_frame(jpeg.PixelData, 0, number_of_frames=1)
    ]
    with pytest.raises(media.NotAcceptable, match="big-endian"):
        wado.frames(BIG_ENDIAN.read_bytes(), [1])


J2K = "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize(
    ("accept", "syntax", "part"),
    [
        (None, EXPLICIT_LE, f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
        ('multipart/related; type="application/octet-stream"', EXPLICIT_LE, "octet-stream"),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", J2K, "octet"),
        (f'multipart/related; type="image/jp2"; transfer-syntax={J2K}', J2K, "image/jp2"),
        ('multipart/related; type="image/jp2"', J2K, f"image/jp2; transfer-syntax={J2K}"),
        ("*/*", J2K, "image/jp2"),
        ('multipart/related; type="image/x-dicom-rle"', "1.2.840.10008.1.2.5", "x-dicom-rle"),
    ],
)
def test_frames_are_offered_as_stored(accept: str | None, syntax: str, part: str) -> None:
    assert part in media.frames(accept, syntax)
    assert media.frames(accept, syntax).endswith(f"; transfer-syntax={syntax}")


@pytest.mark.parametrize(
    ("accept", "syntax"),
    [
        ('multipart/related; type="application/octet-stream"', J2K),
        ('multipart/related; type="image/jpeg"', J2K),
        (f'multipart/related; type="image/jp2"; transfer-syntax={EXPLICIT_LE}', J2K),
        ('multipart/related; type="image/jp2"', EXPLICIT_LE),
    ],
)
def test_frames_that_would_need_a_codec_are_refused(accept: str, syntax: str) -> None:
    with pytest.raises(media.NotAcceptable, match=syntax):
        media.frames(accept, syntax)


# -- QIDO-RS ---------------------------------------------------------------------------
def test_query_parameters_become_matches() -> None:
    query = qido.parse(
        Level.STUDY,
        [
            ("PatientName", "doe*"),
            ("00100020", "12?4"),
            ("StudyDate", "20240101-"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("AccessionNumber", ""),
            ("includefield", "StudyDescription,Nonsense"),
            ("limit", "5000"),
            ("fuzzymatching", "true"),
        ],
    )
    matches = {m.keyword: m for m in query.search.matches}
    assert matches["PatientName"].kind == Kind.WILDCARD
    assert matches["PatientID"].values == ("12?4",)
    assert matches["StudyDate"].kind == Kind.RANGE
    assert matches["StudyDate"].values == ("20240101", "")
    assert matches["StudyInstanceUID"].values == ("1.2.3", "1.2.4")
    assert "AccessionNumber" not in matches and "AccessionNumber" in query.returned
    assert "StudyDescription" in query.returned
    assert query.search.limit == qido.MAX_LIMIT
    assert len(query.warnings) == 3  # unknown includefield, limit, fuzzy matching


def test_value_lists_and_unknown_parameters() -> None:
    """PS3.18 8.3.4: a UID key may be repeated (its values form a list); unknown
    parameters and unsupported matching options are ignored with a Warning each."""
    query = qido.parse(
        Level.SERIES,
        [
            ("ModalitiesInStudy", "CT,MR"),
            ("Modality", "CT\\M?"),
            ("SeriesNumber", "1,02"),
            ("StudyInstanceUID", "1.2.3"),
            ("StudyInstanceUID", "1.2.4\\1.2.5"),
            ("orderby", "StudyDate"),
            ("multiplevaluematching", "true"),
            ("emptyvaluematching", "false"),
        ],
    )
    matches = {m.keyword: m for m in query.search.matches}
    assert {m.kind for m in matches.values()} == {Kind.ANY_OF}
    assert matches["ModalitiesInStudy"].values == ("CT", "MR")
    assert matches["Modality"].values == ("CT", "M?")
    assert matches["SeriesNumber"].values == ("1", "2")
    assert matches["StudyInstanceUID"].values == ("1.2.3", "1.2.4", "1.2.5")
    assert query.warnings == [
        "orderby is not a query parameter here; ignored",
        "The multiplevaluematching parameter is not supported."
        " Multiple Value Matching has not been performed.",
    ]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("StudyDate", "2024-01-01")], "StudyDate"),
        ([("StudyTime", "25:00")], "StudyTime"),
        ([("StudyInstanceUID", "1.2.03")], "StudyInstanceUID"),
        ([("StudyInstanceUID", "1.2.*")], "StudyInstanceUID"),
        ([("Modality", "CT")], "Modality"),
        ([("ReferencedSeriesSequence.SeriesInstanceUID", "1.2")], "sequences"),
        ([("PatientWeight", "70")], "not a supported matching key"),
        ([("limit", "-1")], "limit"),
        ([("offset", "x")], "offset"),
        ([("fuzzymatching", "maybe")], "fuzzymatching"),
        ([("StudyDate", "20240101,20240102")], "range"),
        ([("ModalitiesInStudy", "CT,,MR")], "empty value"),
        ([("PatientID", "1"), ("PatientID", "2")], "more than once"),
        ([("multiplevaluematching", "yes")], "multiplevaluematching"),
        ([("emptyvaluematching", "1")], "emptyvaluematching"),
        ([("NumberOfStudyRelatedInstances", "3")], "not a supported matching key"),
        # Not in pydicom's dictionary: once a KeyError and a 500 (found by schemathesis).
        ([("43799004", "x")], "43799004"),
    ],
)
def test_query_errors_name_the_parameter(params: list[tuple[str, str]], named: str) -> None:
    with pytest.raises(qido.QueryError, match=named):
        qido.parse(Level.STUDY, params)


TAGS = st.text("0123456789ABCDEF", min_size=8, max_size=8)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from([*qido.MATCHING_KEYS[Level.INSTANCE], "limit", "includefield"]),
                st.just("x"),
                TAGS,
            ),
            st.one_of(st.text(max_size=40), TAGS),
        ),
        max_size=6,
    )
)
def test_query_parsing_accepts_or_explains(params: list[tuple[str, str]]) -> None:
    try:
        query = qido.parse(Level.INSTANCE, params)
    except qido.QueryError as exc:
        message = str(exc)
    else:
        message = ""
        assert query.search.limit <= qido.MAX_LIMIT
    # A refusal names what it refuses: a parameter of the request or a value in it.
    assert (
        not message
        or any(k in message or v[:20] in message for k, v in params)
        or "limit" in message
    )
