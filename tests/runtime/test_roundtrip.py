"""Every sample data set pydicom ships, in every transfer syntax, is stored exactly as sent.

pynetdicom sends each file's encoded data set straight from disk (no decoding, no
re-encoding), so what the gateway received is byte for byte the file's data set; the
stored file must hold exactly those bytes under the same transfer syntax, and the catalog
must know the instance."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from pynetdicom import AE, _config

from .conftest import GatewayProcess, dataset_bytes, retrieved, sop_uid, stored

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_IMAGES = Path(str(get_testdata_file("RG1_UNCR.dcm", download=False))).parent

# Samples pydicom ships on purpose broken; the bad-input tests send them.
BROKEN = {
    "MR_truncated.dcm": "pixel data cut short",
    "rtplan_truncated.dcm": "a sequence cut short",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "last fragment cut short",
    "bad_sequence.dcm": "SOP Instance UID with invalid characters",
    "SC_rgb_jpeg.dcm": "implicit VR data set under an explicit VR transfer syntax",
}


def samples() -> list[Path]:
    """Sample files that are Part 10 files with the identifying UIDs a store needs."""
    found = []
    for path in sorted([*PYDICOM_FILES.rglob("*.dcm"), *REAL_IMAGES.glob("*.dcm")]):
        if path.name in BROKEN:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: S112  (no meta, not DICOM: not a store sample)
                continue
        meta = ds.file_meta
        uids = [
            meta.get("TransferSyntaxUID"),
            meta.get("MediaStorageSOPClassUID"),
            ds.get("SOPInstanceUID"),
            ds.get("StudyInstanceUID"),
            ds.get("SeriesInstanceUID"),
        ]
        if all(u is not None and UID(u).is_valid for u in uids):
            found.append(path)
    return found


SAMPLES = samples()


@pytest.fixture(autouse=True)
def raw_sending() -> Iterator[None]:
    """pynetdicom sends a file's encoded data set as it is, instead of decoding and
    re-encoding it (which would drop group lengths and so change the bytes)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = False


def send(gateway: GatewayProcess, paths: list[Path]) -> list[int]:
    """One association per file (each needs its own transfer syntax); statuses in order."""
    statuses = []
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
        assert assoc.is_established, path.name
        status = assoc.send_c_store(path)
        assoc.release()
        statuses.append(int(status.Status))
    return statuses


def test_there_are_samples_of_every_kind() -> None:
    syntaxes = {str(pydicom.filereader.read_file_meta_info(p).TransferSyntaxUID) for p in SAMPLES}
    assert len(SAMPLES) >= 100
    # implicit, explicit, big endian, deflated, JPEG, JPEG-LS, JPEG 2000, RLE
    for uid in [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ]:
        assert uid in syntaxes


@pytest.mark.timeout(300)
def test_every_sample_round_trips_byte_identical(gateway: GatewayProcess) -> None:
    statuses = send(gateway, SAMPLES)
    assert statuses == [0] * len(SAMPLES), [
        (p.name, hex(s)) for p, s in zip(SAMPLES, statuses, strict=True) if s
    ]
    versions = stored(gateway)
    rows = {v.sop_uid: (v.path, v.transfer_syntax, v.version) for v in versions}
    # A few samples are the same instance in several encodings: those become versions.
    expected_sops = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES
    }
    assert {sop for sop in rows} == expected_sops
    files = {(v.sop_uid, v.version): gateway.read_stored(v.path) for v in versions}
    by_content = {dataset_bytes(raw) for raw in files.values()}
    for path in SAMPLES:
        assert dataset_bytes(path) in by_content, f"{path.name} not stored byte-identical"
    # And through WADO-RS, each instance's current version as it was last sent.
    last = {sop_uid(p): p for p in SAMPLES}
    for sop, path in last.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        served = retrieved(gateway, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop)
        assert served == dataset_bytes(path)[1], f"{path.name} not served byte-identical"
    first = next(iter(files.values()))
    stored_meta = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True).file_meta
    assert stored_meta.ImplementationVersionName == "TELERAD_010"
    assert stored_meta.SourceApplicationEntityTitle == "PYNETDICOM"

    # Sending again what is current is acknowledged and changes nothing: identical
    # duplicates. (An encoding of an instance sent in several is current only if sent
    # last: sent again, it is compared with the current one, and kept as a correction.)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES]
    again = [p for p, sop in zip(SAMPLES, sops, strict=True) if sops.count(sop) == 1][:10]
    assert len(again) == 10
    files_before = gateway.objects()
    assert len(files_before) == len(versions)
    assert send(gateway, again) == [0] * 10
    assert gateway.objects() == files_before
    assert gateway.metric("telerad_gateway_duplicates_total", result="identical") >= 10
