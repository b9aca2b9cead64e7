"""The audit log is complete: for a scripted session, every DICOM association, every
DICOMweb and job API request and every export is in it, once, in order, append-only, and
nothing in it identifies a patient."""

from __future__ import annotations

import io
import json
import subprocess
from typing import Any

import pydicom
import pytest

from telerad import synthetic
from telerad.api.site import Destination, DicomWebPeer
from telerad.runtime.gateway.example import LOCAL_CLIENT
from tests.runtime.conftest import GatewayFactory, GatewayProcess, send_datasets, tool
from tests.runtime.test_dicomweb import stow
from tests.runtime.test_orthanc_dicomweb import OrthancFactory, orthanc_for  # noqa: F401


def records(gateway: GatewayProcess) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((gateway.hot / "audit").glob("audit-*.jsonl")):
        lines += [json.loads(x) for x in path.read_text().splitlines()]
    return sorted(lines, key=lambda r: str(r["time"]))


def part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.reliability(
    "attack", "audit log complete for a scripted session (associations, DICOMweb, exports)"
)
def test_every_association_request_and_export_is_audited_once(
    start_gateway: GatewayFactory,
    orthanc_for: OrthancFactory,  # noqa: F811
) -> None:
    orthanc = orthanc_for(None)
    pacs = Destination(name="pacs", dicomweb=DicomWebPeer(url=f"{orthanc.url}/dicom-web"))
    gateway = start_gateway(destinations=[pacs])
    ct = list(synthetic.ct_series(n_slices=3, size=32, seed=41))
    study = str(ct[0].StudyInstanceUID)

    # The script: a modality's association, a stranger's, a STOW-RS client, a search, a
    # retrieve, a refused request, and an export.
    assert send_datasets(gateway, ct) == [0, 0, 0]
    stranger = subprocess.run(
        [tool("echoscu"), "-aet", "STRANGER", "-aec", gateway.ae_title, "127.0.0.1",
         str(gateway.port)],
        capture_output=True, check=False,
    )  # fmt: skip
    assert stranger.returncode != 0
    xray = synthetic.chest_xray(seed=42, size=(64, 64))
    assert stow(gateway, [part10(xray)]).status_code == 200
    assert len(gateway.get("/studies")) == 2
    assert gateway.get(f"/studies/{study}/series")
    assert gateway.post("/exports", {"study": study, "destination": "pacs"}).status_code == 200

    gateway.wait_for(lambda: sum(r.get("event") == "association" for r in records(gateway)) == 2)
    log = records(gateway)
    associations = [
        (r["calling"], r["result"], r["stored"], r["refused"])
        for r in log
        if r.get("event") == "association"
    ]
    assert associations == [
        ("PYNETDICOM", "released", 3, 0),
        ("STRANGER", "rejected:unknown-caller", 0, 0),
    ]
    requests = [(r["method"], r["route"], r["status"]) for r in log if "route" in r]
    assert requests == [
        ("POST", "/studies", 200),
        ("GET", "/studies", 200),
        ("GET", "/studies/{study}/series", 200),
        ("POST", "/exports", 200),
    ]
    (export,) = [r for r in log if r.get("route") == "/exports"]
    assert export["destination"] == "pacs"
    # Named by the key of its token in the Secret, never by the token.
    assert {r["client"] for r in log if "route" in r} == {LOCAL_CLIENT}
    assert gateway.token not in json.dumps(log)

    # Nothing in it names the patient or the study.
    text = "".join(p.read_text() for p in (gateway.hot / "audit").glob("*.jsonl"))
    for ds in (ct[0], xray):
        for value in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)):
            assert value not in text
    # Append-only: opened with O_APPEND, never rewritten (one more request only adds).
    before = text
    gateway.get("/studies")
    after = "".join(p.read_text() for p in (gateway.hot / "audit").glob("*.jsonl"))
    assert after.startswith(before) and len(after) > len(before)
