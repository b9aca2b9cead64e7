"""Orthanc (Debian's `orthanc` with its DICOMweb plugin) as the other PACS.

Orthanc is configured with the gateway as one of its DICOMweb servers, the way a
hospital PACS would be: it lists our studies with QIDO-RS and pulls one with WADO-RS. The
other way round, the gateway STOWs a study into Orthanc. Either way Orthanc's copy of each
data set equals ours byte for byte.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from telerad import synthetic
from telerad.api.site import Destination, DicomWebPeer
from tests.runtime.conftest import (
    ON_DISK,
    GatewayFactory,
    GatewayProcess,
    free_port,
    parts,
    send_datasets,
    stow,
)
from tests.runtime.test_dicomweb import OHIF_FRAMES, compressed_study, encoded

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def data_set(part10: bytes) -> bytes:
    stream = io.BytesIO(part10)
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return part10[stream.tell() :]


class Orthanc:
    def __init__(
        self, workdir: Path, gateway: GatewayProcess | None, *, dicom: bool = False
    ) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        servers = (
            {
                "telerad": {
                    "Url": f"{gateway.url}/",
                    "HttpHeaders": {"Authorization": f"Bearer {gateway.token}"},
                }
            }
            if gateway
            else {}
        )
        config = {
            "Name": "telerad-test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # With `dicom`, a C-STORE peer as well: AE title ORTHANC, any caller may store.
            "DicomServerEnabled": dicom,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers},
        }
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.log = workdir / "orthanc.log"
        self.start()

    def start(self) -> None:
        """Run Orthanc (again: the same ports and storage), once it answers."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/plugins/dicom-web", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                pytest.fail(f"Orthanc did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120)

    def files(self) -> dict[str, bytes]:
        """SOP Instance UID -> Orthanc's stored file, for every instance it holds."""
        out = {}
        for orthanc_id in httpx.get(f"{self.url}/instances", timeout=30).json():
            tags = httpx.get(f"{self.url}/instances/{orthanc_id}/simplified-tags").json()
            out[tags["SOPInstanceUID"]] = httpx.get(
                f"{self.url}/instances/{orthanc_id}/file", timeout=30
            ).content
        return out


OrthancFactory = Callable[..., Orthanc]


@pytest.fixture
def orthanc_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFactory]:
    for needed in (Path(ORTHANC), PLUGIN):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: `make test` installs orthanc and orthanc-dicomweb")
    started: list[Orthanc] = []

    def start(gateway: GatewayProcess | None, *, dicom: bool = False) -> Orthanc:
        orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), gateway, dicom=dicom)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in started:
        orthanc.stop()


def ours(gateway: GatewayProcess) -> dict[str, bytes]:
    return {
        p.name.removesuffix(".dcm"): data_set(gateway.read_stored(p))
        for p in (gateway.hot / "studies").rglob("*.dcm")
    }


@ON_DISK
def test_orthanc_lists_and_retrieves_our_studies(
    gateway: GatewayProcess, orthanc_for: OrthancFactory
) -> None:
    ct = list(synthetic.ct_series(n_slices=6, size=64, seed=4))
    xray = synthetic.chest_xray(seed=2, size=(128, 96))
    assert send_datasets(gateway, [*ct, xray]) == [0] * 7
    orthanc = orthanc_for(gateway)

    listed = orthanc.post("/dicom-web/servers/telerad/get", {"Uri": "/studies"})
    assert listed.status_code == 200, listed.text
    studies = {s["0020000D"]["Value"][0] for s in listed.json()}
    assert studies == {ct[0].StudyInstanceUID, xray.StudyInstanceUID}

    series = orthanc.post(
        "/dicom-web/servers/telerad/get", {"Uri": f"/studies/{ct[0].StudyInstanceUID}/series"}
    )
    assert [s["00080060"]["Value"] for s in series.json()] == [["CT"]]

    pulled = orthanc.post(
        "/dicom-web/servers/telerad/retrieve",
        {"Resources": [{"Study": ct[0].StudyInstanceUID}]},
    )
    assert pulled.status_code == 200, pulled.text
    theirs = orthanc.files()
    assert theirs.keys() == {ds.SOPInstanceUID for ds in ct}
    mine = ours(gateway)
    for sop, part10 in theirs.items():
        assert data_set(part10) == mine[sop]
    assert (
        orthanc.post(
            "/dicom-web/servers/telerad/get", {"Uri": "/studies/1.2.3/metadata"}
        ).status_code
        != 200
    )


@ON_DISK
def test_gateway_stows_a_study_into_orthanc(
    start_gateway: GatewayFactory, orthanc_for: OrthancFactory
) -> None:
    orthanc = orthanc_for(None)
    destination = Destination(name="orthanc", dicomweb=DicomWebPeer(url=f"{orthanc.url}/dicom-web"))
    gateway = start_gateway(destinations=[destination])
    ct = list(synthetic.ct_series(n_slices=5, size=64, seed=5))
    assert send_datasets(gateway, ct) == [0] * 5

    report = gateway.post("/exports", {"study": ct[0].StudyInstanceUID, "destination": "orthanc"})
    assert report.status_code == 200, report.text
    assert report.json() == {"destination": "orthanc", "status": 200, "stored": 5, "failed": 0}
    theirs, mine = orthanc.files(), ours(gateway)
    assert theirs.keys() == {ds.SOPInstanceUID for ds in ct}
    for sop, part10 in theirs.items():
        assert data_set(part10) == mine[sop]

    assert gateway.post("/exports", {"study": "1.2.3", "destination": "orthanc"}).status_code == 404
    assert (
        gateway.post(
            "/exports", {"study": ct[0].StudyInstanceUID, "destination": "nowhere"}
        ).status_code
        == 404
    )
    orthanc.stop()
    dead = gateway.post("/exports", {"study": ct[0].StudyInstanceUID, "destination": "orthanc"})
    assert dead.status_code == 502
    assert "orthanc" in dead.json()["detail"]


def _uids(answer: httpx.Response, tag: str = "0020000D") -> set[str]:
    assert answer.status_code == 200, answer.text
    return {item[tag]["Value"][0] for item in answer.json()}


def test_value_lists_find_what_orthanc_finds(
    gateway: GatewayProcess, orthanc_for: OrthancFactory
) -> None:
    """Issue 25 item 9: the same studies in both, the same list queries to both's QIDO-RS,
    the same answers (Orthanc reads `,` as "any of", as this gateway does). Not compared:
    `CT\\MR`, which Orthanc 1.10 (DICOMweb 1.7) answers with nothing and this gateway as
    `CT,MR` (PS3.4 leaves a multi-valued key undefined without Multiple Value Matching)."""
    ct = list(synthetic.ct_series(n_slices=2, size=32, seed=31))
    xray = synthetic.chest_xray(seed=32, size=(32, 32))
    mr = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    assert send_datasets(gateway, [*ct, xray, mr]) == [0, 0, 0, 0]
    orthanc = orthanc_for(None)
    for ds in (*ct, xray, mr):
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        stored = httpx.post(f"{orthanc.url}/instances", content=out.getvalue(), timeout=30)
        assert stored.status_code == 200, stored.text
    studies = [str(d.StudyInstanceUID) for d in (ct[0], xray, mr)]
    queries = [
        ("/studies", [("ModalitiesInStudy", "CT,MR")]),
        ("/studies", [("ModalitiesInStudy", "DX,MR")]),
        ("/studies", [("ModalitiesInStudy", "CT")]),
        ("/studies", [("StudyInstanceUID", f"{studies[0]},{studies[1]}")]),
        ("/studies", [("PatientID", f"{ct[0].PatientID},{xray.PatientID}")]),
        ("/series", [("Modality", "CT,DX")]),
        ("/instances", [("Modality", "MR,DX")]),
    ]
    for path, params in queries:
        tag = {"/studies": "0020000D", "/series": "0020000E", "/instances": "00080018"}[path]
        ours = _uids(
            httpx.get(f"{gateway.url}{path}", params=params, headers=gateway.auth, timeout=10),
            tag,
        )
        theirs = _uids(httpx.get(f"{orthanc.url}/dicom-web{path}", params=params, timeout=10), tag)
        assert ours == theirs, (path, params)
        assert ours, (path, params)  # each query finds something: the comparison means something


def test_compressed_frames_equal_orthancs(
    gateway: GatewayProcess, orthanc_for: OrthancFactory
) -> None:
    """Issue 25 item 14: frames of JPEG, JPEG 2000, JPEG-LS and RLE instances, asked for
    the way OHIF asks, are the same bytes from this gateway as from Orthanc."""
    study = compressed_study()
    orthanc = orthanc_for(None)
    for ds in study:
        body = encoded(ds)
        assert httpx.post(f"{orthanc.url}/instances", content=body, timeout=30).status_code == 200
    assert stow(gateway, [encoded(ds) for ds in study]).status_code == 200
    for ds in study:
        count = int(ds.get("NumberOfFrames") or 1)
        path = (
            f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames/{count}"
        )
        accept = {"Accept": OHIF_FRAMES}
        ours = httpx.get(f"{gateway.url}{path}", headers={**gateway.auth, **accept}, timeout=30)
        theirs = httpx.get(f"{orthanc.url}/dicom-web{path}", headers=accept, timeout=30)
        assert theirs.status_code == ours.status_code == 200, theirs.text
        assert [b for _, b in parts(ours)] == [b for _, b in parts(theirs)], ds.file_meta
