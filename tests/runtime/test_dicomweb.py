"""DICOMweb against the reference Python client, dicomweb-client, on a real gateway.

What goes in through STOW-RS comes back through WADO-RS byte for byte (the data set as
sent; the file meta is the gateway's own, as for C-STORE), QIDO-RS finds it by the keys
viewers use, metadata points at bulk data that the bulk data and frame resources serve.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pydicom
import pytest
import yaml
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from requests.exceptions import HTTPError

from telerad import synthetic
from telerad.runtime.gateway.access import new_token
from telerad.runtime.gateway.example import ensure_keyring, example_config
from tests.runtime.conftest import (
    ANY_TRANSFER,
    TELERAD,
    GatewayProcess,
    audit_records,
    free_port,
    parts,
    send_datasets,
    stow,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def encoded(ds: Dataset) -> bytes:
    """The bytes dicomweb-client sends for a data set (it uses pydicom.dcmwrite)."""
    with io.BytesIO() as out:
        pydicom.dcmwrite(out, ds)
        return out.getvalue()


def data_set(part10: bytes) -> bytes:
    """A Part 10 file's data set: everything after the file meta group."""
    stream = io.BytesIO(part10)
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return part10[stream.tell() :]


def client(gateway: GatewayProcess, token: str | None = None) -> DICOMwebClient:
    return DICOMwebClient(
        gateway.url, headers={"Authorization": f"Bearer {token or gateway.token}"}
    )


@pytest.fixture
def study(tmp_path: Path) -> list[Dataset]:
    """A small head CT and, in the same study, a multi-frame series."""
    ct = list(synthetic.ct_series(n_slices=4, size=64, seed=3))
    frames = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    frames.StudyInstanceUID = ct[0].StudyInstanceUID
    frames.PatientID, frames.PatientName = ct[0].PatientID, ct[0].PatientName
    return [*ct, frames]


def test_store_search_and_retrieve_through_dicomweb_client(
    gateway: GatewayProcess, study: list[Dataset]
) -> None:
    web = client(gateway)
    uid = study[0].StudyInstanceUID
    stored = web.store_instances(study[:3])
    referenced = {item.ReferencedSOPInstanceUID for item in stored.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in study[:3]}
    assert "FailedSOPSequence" not in stored
    into_study = web.store_instances(study[3:], study_instance_uid=uid)
    assert into_study.RetrieveURL.endswith(f"/studies/{uid}")
    assert len(into_study.ReferencedSOPSequence) == 2

    # QIDO-RS by the keys a viewer's study list uses.
    (found,) = web.search_for_studies(search_filters={"PatientID": study[0].PatientID})
    assert found["0020000D"]["Value"] == [uid]
    assert found["00201208"]["Value"] == [len(study)]
    assert set(found["00080061"]["Value"]) == {"CT", "MR"}
    date = study[0].StudyDate
    assert web.search_for_studies(search_filters={"StudyDate": f"{date}-{date}"})
    assert not web.search_for_studies(search_filters={"StudyDate": "19000101-19001231"})
    name = str(study[0].PatientName)
    assert web.search_for_studies(search_filters={"PatientName": name[:3].lower() + "*"})
    series = web.search_for_series(uid)
    assert len(series) == 2
    (mr_series,) = web.search_for_series(search_filters={"Modality": "MR"})
    assert mr_series["0020000E"]["Value"] == [study[-1].SeriesInstanceUID]
    everywhere = web.search_for_instances(search_filters={"PatientID": study[0].PatientID})
    assert len(everywhere) == len(study)
    ct_series = study[0].SeriesInstanceUID
    instances = web.search_for_instances(uid, ct_series, fields=["Rows"])
    assert {i["00080018"]["Value"][0] for i in instances} == {ds.SOPInstanceUID for ds in study[:4]}
    assert all(i["00280010"]["Value"] == [64] for i in instances)
    first, second = (
        web.search_for_instances(uid, limit=2),
        web.search_for_instances(uid, limit=2, offset=2),
    )
    assert len(first) == len(second) == 2
    assert not {i["00080018"]["Value"][0] for i in first} & {
        i["00080018"]["Value"][0] for i in second
    }

    # WADO-RS: the client's view, then the bytes themselves.
    retrieved = {ds.SOPInstanceUID: ds for ds in web.retrieve_study(uid)}
    assert retrieved.keys() == {ds.SOPInstanceUID for ds in study}
    for ds in study:
        assert retrieved[ds.SOPInstanceUID] == ds
    raw = httpx.get(f"{gateway.url}/studies/{uid}", headers=gateway.auth, timeout=30)
    assert raw.status_code == 200
    assert 'type="application/dicom"' in raw.headers["content-type"]
    sent = {ds.SOPInstanceUID: data_set(encoded(ds)) for ds in study}
    got = parts(raw)
    assert len(got) == len(study)
    for content_type, body in got:
        assert content_type.params["transfer-syntax"] == EXPLICIT_LE
        sop = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID
        assert data_set(body) == sent[sop]

    mr = study[-1]
    (one,) = web.retrieve_series(uid, mr.SeriesInstanceUID)
    assert one == mr
    assert web.retrieve_instance(uid, ct_series, study[1].SOPInstanceUID) == study[1]


def test_a_client_that_hangs_up_mid_study_costs_the_next_one_nothing(
    gateway: GatewayProcess,
) -> None:
    """The instances read ahead of the one being sent are dropped when the client goes:
    nothing is logged as failing, and the next retrieval gets every instance, in order."""
    ct = list(synthetic.ct_series(n_slices=24, size=256, seed=4))
    assert send_datasets(gateway, ct) == [0] * len(ct)
    uid = str(ct[0].StudyInstanceUID)
    url, headers = f"{gateway.url}/studies/{uid}", {**gateway.auth, "Accept": ANY_TRANSFER}
    with httpx.stream("GET", url, headers=headers, timeout=30) as answer:
        assert answer.status_code == 200
        assert next(answer.iter_raw(64 << 10))  # a part of the first instance, then gone
    whole = httpx.get(url, headers=headers, timeout=30)
    assert whole.status_code == 200
    order = [
        pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID
        for _, body in parts(whole)
    ]
    assert sorted(order) == sorted(ds.SOPInstanceUID for ds in ct)
    listed = gateway.get(f"/studies/{uid}/instances", limit=100)
    assert order == [i["00080018"]["Value"][0] for i in listed], "parts out of catalog order"
    log = gateway.log.read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


def test_metadata_bulk_data_and_frames(gateway: GatewayProcess, study: list[Dataset]) -> None:
    web = client(gateway)
    web.store_instances(study)
    uid, mr = study[0].StudyInstanceUID, study[-1]
    metadata = web.retrieve_study_metadata(uid)
    assert len(metadata) == len(study)
    series_metadata = web.retrieve_series_metadata(uid, study[0].SeriesInstanceUID)
    assert {m["00080018"]["Value"][0] for m in series_metadata} == {
        ds.SOPInstanceUID for ds in study[:4]
    }
    meta = web.retrieve_instance_metadata(uid, mr.SeriesInstanceUID, mr.SOPInstanceUID)
    pixel = meta["7FE00010"]
    assert "Value" not in pixel and "InlineBinary" not in pixel
    bulk = web.retrieve_bulkdata(pixel["BulkDataURI"])
    assert bulk == [mr.PixelData]
    assert (
        Dataset.from_json({k: v for k, v in meta.items() if "BulkDataURI" not in v}).PatientID
        == mr.PatientID
    )

    frame_bytes = mr.Rows * mr.Columns * mr.BitsAllocated // 8
    frames = web.retrieve_instance_frames(uid, mr.SeriesInstanceUID, mr.SOPInstanceUID, [3, 1])
    assert frames == [
        mr.PixelData[2 * frame_bytes : 3 * frame_bytes],
        mr.PixelData[:frame_bytes],
    ]
    assert np.array_equal(
        np.frombuffer(frames[1], dtype="<u2").reshape(mr.Rows, mr.Columns), mr.pixel_array[0]
    )
    out_of_range = httpx.get(
        f"{gateway.url}/studies/{uid}/series/{mr.SeriesInstanceUID}/instances/"
        f"{mr.SOPInstanceUID}/frames/{mr.NumberOfFrames + 1}",
        headers=gateway.auth,
    )
    assert out_of_range.status_code == 404


def test_stow_reports_what_it_refused_and_keeps_what_it_took(
    gateway: GatewayProcess, study: list[Dataset]
) -> None:
    good, other = encoded(study[0]), encoded(study[1])
    truncated = encoded(study[2])[:-100]
    response = stow(gateway, [good, truncated])
    assert response.status_code == 202
    body = Dataset.from_json(response.json())
    (failed,) = body.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == study[2].SOPInstanceUID
    assert failed.FailureReason == 0xC000
    (ok,) = body.ReferencedSOPSequence
    assert ok.ReferencedSOPInstanceUID == study[0].SOPInstanceUID
    assert ok.RetrieveURL.endswith(f"/instances/{study[0].SOPInstanceUID}")

    # Everything refused is a 409; an instance of another study is refused on its own URL.
    stranger = next(synthetic.ct_series(n_slices=1, size=16, seed=9))
    wrong = stow(gateway, [encoded(stranger)], f"/studies/{study[0].StudyInstanceUID}")
    assert wrong.status_code == 409
    assert Dataset.from_json(wrong.json()).FailedSOPSequence[0].FailureReason == 0xA900
    assert stow(gateway, [b"not DICOM at all"]).status_code == 409
    right = stow(gateway, [other], f"/studies/{study[0].StudyInstanceUID}")
    assert right.status_code == 200

    unsupported = stow(
        gateway, [good], content_type='multipart/related; type="application/dicom+xml"; boundary=x'
    )
    assert unsupported.status_code == 415
    assert stow(gateway, [good], content_type="application/json").status_code == 415

    # Both accepted instances are catalogued and served; the refused ones are nowhere.
    found = client(gateway).search_for_instances(study[0].StudyInstanceUID)
    assert {i["00080018"]["Value"][0] for i in found} == {
        study[0].SOPInstanceUID,
        study[1].SOPInstanceUID,
    }


def test_c_store_and_stow_share_one_archive(gateway: GatewayProcess, study: list[Dataset]) -> None:
    """An instance stored by C-STORE is served by WADO-RS; re-sending it by STOW is no
    new version."""
    assert send_datasets(gateway, study[:2]) == [0, 0]
    web = client(gateway)
    assert (
        web.retrieve_instance(
            study[0].StudyInstanceUID, study[0].SeriesInstanceUID, study[0].SOPInstanceUID
        )
        == study[0]
    )
    web.store_instances(study[:2])
    assert gateway.metric("telerad_gateway_duplicates_total", result="identical") == 2


def test_errors_are_problems_and_not_found_is_404(gateway: GatewayProcess) -> None:
    missing = "1.2.3.4.5"
    for path in (
        f"/studies/{missing}",
        f"/studies/{missing}/metadata",
        f"/studies/{missing}/series/1.2/instances/1.3/frames/1",
        "/studies/not-a-uid",
    ):
        response = httpx.get(f"{gateway.url}{path}", headers=gateway.auth)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("application/problem+json")
    bad = httpx.get(f"{gateway.url}/studies", params={"StudyDate": "2020-01"}, headers=gateway.auth)
    assert bad.status_code == 400
    assert "StudyDate" in bad.json()["detail"]
    unacceptable = httpx.get(
        f"{gateway.url}/studies", headers={**gateway.auth, "Accept": "application/dicom+xml"}
    )
    assert unacceptable.status_code == 406
    with pytest.raises(HTTPError):
        client(gateway).retrieve_study(missing)


def test_other_tenants_learn_nothing(gateway: GatewayProcess, study: list[Dataset]) -> None:
    """Every operation of the OpenAPI description, with another tenant's token, is a 403
    whose body is the same for a study that exists and one that does not."""
    client(gateway).store_instances(study[:1])
    ds = study[0]
    real = {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "instance": ds.SOPInstanceUID,
    }
    fake = {"study": "1.2.3", "series": "1.2.4", "instance": "1.2.5"}
    other = {"Authorization": f"Bearer {new_token('another-tenant')}"}
    wrong = {"Authorization": f"Bearer {new_token(gateway.config.namespace)}"}
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    checked = 0
    for template, operations in spec["paths"].items():
        for method, operation in operations.items():
            if operation.get("security") == []:
                continue
            answers = []
            for uids in (real, fake):
                path = template.format(**uids, frames="1", tag="7FE00010", job="1")
                for headers, expected in ((other, 403), (wrong, 401), ({}, 401)):
                    response = httpx.request(
                        method, f"{gateway.url}{path}", headers=headers, json={}
                    )
                    assert response.status_code == expected, (method, template, response.text)
                    answers.append(response.content)
            assert answers[:3] == answers[3:], template
            checked += 1
    assert checked >= 20
    # The audit log has every one of those requests, with UIDs hashed and no patient data.
    lines = audit_records(gateway)
    denied = [r for r in lines if r["status"] in (401, 403)]
    assert len(denied) == checked * 6
    assert {r["tenant"] for r in denied if r["status"] == 403} == {"another-tenant"}
    text = "\n".join(json.dumps(r) for r in lines)
    assert ds.StudyInstanceUID not in text
    assert str(ds.PatientName) not in text and ds.PatientID not in text
    stored = next(r for r in lines if r["method"] == "POST" and r["status"] == 200)
    assert stored["client"] == "local" and stored["stored"] == 1
    forbidden = gateway.metric(
        "telerad_gateway_http_request_seconds_count", route="/studies/{study}", code="403"
    )
    assert forbidden >= 2
    assert ds.StudyInstanceUID not in httpx.get(f"{gateway.url}/metrics").text


def test_tokens_are_reloaded_when_the_secret_changes(gateway: GatewayProcess) -> None:
    assert gateway.config.tokens_dir is not None
    token = new_token(gateway.config.namespace)
    refused = httpx.get(f"{gateway.url}/studies", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    (gateway.config.tokens_dir / "viewer").write_text(token)

    def accepted() -> bool:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(f"{gateway.url}/studies", headers=headers).status_code == 200

    gateway.wait_for(accepted, timeout=15)


def test_a_bad_token_file_stops_the_gateway_with_a_clear_error(tmp_path: Path) -> None:
    config = example_config(free_port(), free_port(), tmp_path / "data")
    ensure_keyring(config)
    assert config.tokens_dir is not None
    config.tokens_dir.mkdir(parents=True)
    (config.tokens_dir / "viewer").write_text("password123")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config.to_wire()))
    run = subprocess.run(
        [str(TELERAD), "gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert "token 'viewer'" in run.stderr and "telerad token --tenant" in run.stderr
    assert "password123" not in run.stderr + run.stdout


# -- value lists, unknown parameters, Specific Character Set (issue 25 items 9 and 16) ----
def _search(gateway: GatewayProcess, path: str, params: list[tuple[str, str]]) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", params=params, headers=gateway.auth, timeout=10)


def _studies(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {s["0020000D"]["Value"][0] for s in response.json()}


def test_value_lists_and_unknown_parameters_follow_ps3_18(gateway: GatewayProcess) -> None:
    ct = list(synthetic.ct_series(n_slices=2, size=32, seed=21))
    mr = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    xray = synthetic.chest_xray(seed=22, size=(32, 32))
    del xray.SpecificCharacterSet  # one study whose data has none
    assert send_datasets(gateway, [*ct, xray]) == [0, 0, 0]
    assert stow(gateway, [encoded(mr)]).status_code == 200
    ct_uid, mr_uid, xr_uid = (str(d.StudyInstanceUID) for d in (ct[0], mr, xray))

    # A value list matches any of its values, with `,` (PS3.18) or `\` (PS3.4).
    for modalities in ("CT,MR", "CT\\MR", "MR,C?"):
        answer = _search(gateway, "/studies", [("ModalitiesInStudy", modalities)])
        assert _studies(answer) == {ct_uid, mr_uid}, modalities
        assert "Warning" not in answer.headers
    both = [("StudyInstanceUID", ct_uid), ("StudyInstanceUID", xr_uid)]
    assert _studies(_search(gateway, "/studies", both)) == {ct_uid, xr_uid}
    (series,) = _search(gateway, "/series", [("Modality", "DX,SR")]).json()
    assert series["0020000D"]["Value"] == [xr_uid]

    # Unknown parameters and unsupported options are ignored, each with a Warning.
    answer = _search(
        gateway,
        "/studies",
        [("ModalitiesInStudy", "CT\\MR"), ("multiplevaluematching", "true"), ("_", "1")],
    )
    assert _studies(answer) == {ct_uid, mr_uid}
    warnings = answer.headers.get_list("Warning")
    assert (
        '299 telerad "The multiplevaluematching parameter is not supported.'
        ' Multiple Value Matching has not been performed."' in warnings
    )
    assert '299 telerad "_ is not a query parameter here; ignored"' in warnings
    # What is known but malformed, or cannot be matched, is still refused.
    for bad in (
        [("multiplevaluematching", "maybe")],
        [("StudyDate", "20240101,20240102")],
        [("PatientWeight", "70")],
    ):
        refused = _search(gateway, "/studies", bad)
        assert refused.status_code == 400, bad
        assert bad[0][0] in refused.json()["detail"]

    # Specific Character Set, at every level, where the stored instance has one.
    for path in ("/studies", "/series", "/instances"):
        found = {r["0020000D"]["Value"][0]: r for r in _search(gateway, path, []).json()}
        assert found[ct_uid]["00080005"] == {"vr": "CS", "Value": ["ISO_IR 100"]}, path
        assert found[mr_uid]["00080005"] == {"vr": "CS", "Value": [mr.SpecificCharacterSet]}
        assert "00080005" not in found[xr_uid], path


def test_bulk_data_uri_only_for_values_over_1_kib(gateway: GatewayProcess) -> None:
    """The documented threshold counts the value's bytes, not its base64 text."""
    ds = next(synthetic.ct_series(n_slices=1, size=16, seed=23))
    ds.add_new(0x00281201, "OW", bytes(range(256)) * 3 + bytes(26))  # 794 bytes
    ds.add_new(0x00281202, "OW", bytes(1024))
    ds.add_new(0x00281203, "OW", bytes(1026))
    assert send_datasets(gateway, [ds]) == [0]
    meta = client(gateway).retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert (
        Dataset.from_json({"00281201": meta["00281201"]})[0x00281201].value == ds[0x00281201].value
    )
    assert "InlineBinary" in meta["00281202"]
    uri = meta["00281203"]["BulkDataURI"]
    assert client(gateway).retrieve_bulkdata(uri) == [bytes(1026)]


# -- compressed frames (issue 25 item 14) --------------------------------------------------
COMPRESSED = {
    # file: (transfer syntax, the image media type of PS3.18 table 8.7.3-5)
    "SC_jpeg_no_color_transform.dcm": ("1.2.840.10008.1.2.4.50", "image/jpeg"),
    "SC_rgb_jpeg_gdcm.dcm": ("1.2.840.10008.1.2.4.70", "image/jpeg"),
    "emri_small_jpeg_2k_lossless.dcm": ("1.2.840.10008.1.2.4.90", "image/jp2"),
    "JPEG2000.dcm": ("1.2.840.10008.1.2.4.91", "image/jp2"),
    "emri_small_jpeg_ls_lossless.dcm": ("1.2.840.10008.1.2.4.80", "image/jls"),
    "JPEGLSNearLossless_08.dcm": ("1.2.840.10008.1.2.4.81", "image/jls"),
    "emri_small_RLE.dcm": ("1.2.840.10008.1.2.5", "image/dicom-rle"),
    "SC_rgb_rle_2frame.dcm": ("1.2.840.10008.1.2.5", "image/dicom-rle"),
}
# What OHIF (dicomweb-client JS) sends for frames.
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def compressed_study() -> list[Dataset]:
    """The compressed samples of pydicom-data as one study, each its own instance (the
    emri_small variants share their UIDs)."""
    out = []
    study = pydicom.uid.generate_uid()
    for name in COMPRESSED:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        out.append(ds)
    return out


def test_compressed_frames_are_served_as_stored(gateway: GatewayProcess) -> None:
    study = compressed_study()
    stored = stow(gateway, [encoded(ds) for ds in study])
    assert stored.status_code == 200, stored.text
    web = client(gateway)
    for name, ds in zip(COMPRESSED, study, strict=True):
        syntax, image_type = COMPRESSED[name]
        assert ds.file_meta.TransferSyntaxUID == syntax
        count = int(ds.get("NumberOfFrames") or 1)
        numbers = [count, 1] if count > 1 else [1]
        expected = [get_frame(ds.PixelData, n - 1, number_of_frames=count) for n in numbers]
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        for media_types in ((("application/octet-stream", "*"),), ((image_type, syntax),)):
            frames = web.retrieve_instance_frames(*uids, numbers, media_types=media_types)
            assert frames == expected, (name, media_types)

        url = f"{gateway.url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
        raw = httpx.get(
            f"{url}/frames/{','.join(map(str, numbers))}",
            headers={**gateway.auth, "Accept": OHIF_FRAMES},
            timeout=10,
        )
        assert raw.status_code == 200, (name, raw.text)
        got = parts(raw)
        assert [body for _, body in got] == expected
        for content_type, _ in got:
            assert content_type.content_type == "application/octet-stream"
            assert content_type.params["transfer-syntax"] == syntax
        # Raw pixels cannot be had without decoding: 406, naming what can.
        native = httpx.get(
            f"{url}/frames/1",
            headers={
                **gateway.auth,
                "Accept": 'multipart/related; type="application/octet-stream"',
            },
            timeout=10,
        )
        assert native.status_code == 406 and syntax in native.json()["detail"]

        meta = web.retrieve_instance_metadata(*uids)
        assert meta["00020010"] == meta["00083002"] == {"vr": "UI", "Value": [syntax]}
