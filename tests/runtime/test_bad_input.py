"""Bad input gets a clear DIMSE failure or a reject, nothing partial is catalogued, and
every instance stored before is still intact.

Broken data sets are sent with pynetdicom exactly as written (its chunked mode reads the
file after the meta and sends the bytes unchanged); broken PDUs are written to the
association's socket directly."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from telerad import synthetic
from telerad.api.config import CatalogConfig

from .conftest import ON_DISK, GatewayFactory, GatewayProcess, dataset_bytes, stored
from .test_disk_full import tmpfs
from .test_roundtrip import BROKEN, PYDICOM_FILES, REAL_IMAGES

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture(autouse=True)
def raw_sending() -> Iterator[None]:
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = False


def part10(tmp: Path, name: str, body: bytes, *, sop: str, ts: str = EXPLICIT) -> Path:
    """A Part 10 file whose meta announces `sop` and whose data set is `body`, verbatim."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = CT_CLASS
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, pydicom.dataset.FileMetaDataset(meta))
    path = tmp / name
    path.write_bytes(buffer.getvalue() + body)
    return path


def with_changes(**changes: str | None) -> bytes:
    """CT_small's data set re-encoded with some attributes changed or removed."""
    ds = pydicom.dcmread(CT_SMALL)
    for keyword, value in changes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dataset_bytes_of(buffer.getvalue())


def dataset_bytes_of(raw: bytes) -> bytes:
    (length,) = struct.unpack_from("<I", raw, 140)
    return raw[144 + length :]


def store(gateway: GatewayProcess, path: Path) -> Dataset:
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return status


def catalogued(gateway: GatewayProcess) -> list[tuple[str, str]]:
    return sorted((v.sop_uid, v.path) for v in stored(gateway))


@pytest.mark.reliability("attack", "malformed data sets over C-STORE")
@ON_DISK
def test_broken_data_sets_are_refused_and_nothing_else_changes(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    assert int(store(gateway, CT_SMALL).Status) == 0
    before = catalogued(gateway)
    (good_file,) = [gateway.hot / p for _, p in before]
    good = CT_SMALL.read_bytes()
    body = dataset_bytes_of(good)
    sop = str(pydicom.dcmread(CT_SMALL).SOPInstanceUID)
    other = "1.2.826.0.1.3680043.10.1471.99."

    garbled_vr = bytearray(body)
    garbled_vr[100:164] = b"\xff" * 64  # in the header elements, where structure is
    cases: dict[str, tuple[Path, str]] = {
        "truncated pixel data": (
            part10(tmp_path, "a.dcm", body[:-1000], sop=sop),
            "claims",
        ),
        "cut inside an element header": (
            part10(tmp_path, "b.dcm", body[:301], sop=sop),
            "truncated element header",
        ),
        "garbled bytes": (
            part10(tmp_path, "c.dcm", bytes(garbled_vr), sop=sop),
            "invalid value representation",
        ),
        "garbage that does not inflate": (
            part10(tmp_path, "d.dcm", b"\xff" * 1000, sop=sop, ts=DEFLATED),
            "does not inflate",
        ),
        "deflated and cut short": (
            part10(tmp_path, "e.dcm", _deflate(body)[:-50], sop=sop, ts=DEFLATED),
            "",
        ),
        "no Study Instance UID": (
            part10(tmp_path, "f.dcm", with_changes(StudyInstanceUID=None), sop=sop),
            "StudyInstanceUID (0020,000D) is missing",
        ),
        "study UID climbing out of the archive": (
            part10(
                tmp_path,
                "g.dcm",
                with_changes(StudyInstanceUID="../../escape"),
                sop=sop,
            ),
            "StudyInstanceUID (0020,000D) is not a valid UID",
        ),
        "SOP Instance UID with a path in it": (
            part10(
                tmp_path,
                "h.dcm",
                with_changes(SOPInstanceUID=other + "1/../../x"),
                sop=other + "1/../../x",
            ),
            "invalid UID in request",
        ),
        "series UID with a leading zero": (
            part10(tmp_path, "i.dcm", with_changes(SeriesInstanceUID="1.2.03"), sop=sop),
            "SeriesInstanceUID (0020,000E) is not a valid UID",
        ),
        "empty data set": (part10(tmp_path, "j.dcm", b"", sop=sop), "is missing"),
    }
    for name, (path, message) in cases.items():
        status = store(gateway, path)
        assert int(status.Status) == 0xC000, name
        assert message in str(status.get("ErrorComment", "")), (name, status)
    for name in BROKEN:
        (path,) = [*PYDICOM_FILES.rglob(name), *REAL_IMAGES.glob(name)]
        assert int(store(gateway, path).Status) != 0, name

    assert catalogued(gateway) == before
    assert gateway.read_stored(good_file)[-len(body) :] == body
    # Instances only: the catalog sits at the top, the audit log in audit/.
    files = [
        p
        for p in gateway.hot.rglob("*")
        if p.is_file() and p.parent != gateway.hot and p.parent.name != "audit"
    ]
    assert files == [good_file], "nothing partial or temporary may remain"
    assert not (gateway.hot.parent / "escape").exists()
    refused = len(cases) + len(BROKEN)
    assert gateway.metric("telerad_gateway_rejections_total") == refused


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _store_pdus(assoc: Association, path: Path) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE of `path`, encoded but not sent."""
    ds = pydicom.dcmread(path)
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset_bytes(path)[1])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = assoc.accepted_contexts[0]
    pdus = []
    for primitive in message.encode_msg(context.context_id, 4096):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def _associate(gateway: GatewayProcess, sop_class: str = CT_CLASS) -> Association:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(sop_class, EXPLICIT)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    return assoc


def _wait_closed(assoc: Association, gateway: GatewayProcess) -> None:
    gateway.wait_for(lambda: not assoc.is_established or assoc.is_aborted, timeout=20)


@pytest.mark.reliability("attack", "oversized PDU and aborted transfer")
def test_oversized_pdu_and_aborted_transfer_leave_nothing_behind(
    gateway: GatewayProcess,
) -> None:
    assert int(store(gateway, CT_SMALL).Status) == 0
    before = catalogued(gateway)

    # A P-DATA-TF PDU that claims 64 MiB: far over the maximum the gateway announced.
    assoc = _associate(gateway)
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 64 << 20) + b"\0" * 4096)
    _wait_closed(assoc, gateway)
    gateway.wait_for(
        lambda: gateway.metric("telerad_gateway_rejections_total", reason="oversized-pdu") == 1
    )

    # Half a C-STORE, then the connection drops.
    mr = Path(str(get_testdata_file("MR_small.dcm")))
    assoc = _associate(gateway, "1.2.840.10008.5.1.4.1.1.4")
    pdus = _store_pdus(assoc, mr)
    assert len(pdus) >= 3  # the command, then data set fragments
    raw = assoc.dul.socket.socket
    for pdu in pdus[:2]:
        raw.sendall(pdu)
    raw.shutdown(2)
    gateway.wait_for(
        lambda: (
            gateway.metric("telerad_gateway_associations_total", result="aborted") >= 1
            or gateway.get("/healthz")["associations"] == 0
        )
    )

    assert catalogued(gateway) == before
    assert gateway.get("/healthz")["ok"]
    # The gateway still takes the same instance whole.
    assert int(store(gateway, mr).Status) == 0
    assert len(catalogued(gateway)) == 2


@pytest.mark.reliability(
    "fault", "hot tier without room for a 30 MB data set (free-space watermark)"
)
def test_a_data_set_larger_than_the_free_space_is_refused_cleanly(
    start_gateway: GatewayFactory, catalog_config: CatalogConfig, tmp_path: Path
) -> None:
    """The gateway reads such a data set to its end without keeping it, answers Out of
    Resources, and goes on taking instances that fit. The hot tier is a 24 MiB tmpfs of
    its own: a margin measured on the shared disk was eaten by whatever else the suite
    wrote meanwhile, and the gateway then never got healthy (a full tier is unready)."""
    with tmpfs(tmp_path / "hot", "size=24m") as hot:
        gateway = start_gateway(
            catalog=catalog_config, storage={"hot_dir": hot, "min_free_bytes": 0}
        )
        refused_cleanly(gateway)


def refused_cleanly(gateway: GatewayProcess) -> None:
    big = synthetic.chest_xray(seed=5, size=(3872, 3872))  # about 30 MB
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(big.SOPClassUID, EXPLICIT)
    ae.add_requested_context(CT_CLASS, EXPLICIT)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    refused = assoc.send_c_store(big)
    assert int(refused.Status) == 0xA700
    assert "does not fit" in str(refused.ErrorComment)
    assert int(assoc.send_c_store(pydicom.dcmread(CT_SMALL)).Status) == 0
    assoc.release()
    assert len(catalogued(gateway)) == 1
    assert gateway.metric("telerad_gateway_rejections_total", reason="out-of-space") == 1
