"""The audit trail is complete: for a scripted session, every DICOM association, every
DICOMweb and job API request and every export is in it, once, in order, append-only, and
nothing in it identifies a patient. On either backend: day files beside an SQLite
catalog, the `audit` table of a PostgreSQL one (tests/store/test_audit_table.py has what
the database itself enforces)."""

from __future__ import annotations

import io
import json
import subprocess
from typing import Any

import httpx2 as httpx
import pydicom
import pytest

from telerad import synthetic
from telerad.api.site import Destination, DicomWebPeer
from telerad.runtime.gateway.access import MAX_KEY_CHARS, MAX_QUERY_KEYS
from telerad.runtime.gateway.example import LOCAL_CLIENT
from tests.runtime.conftest import (
    GatewayFactory,
    GatewayProcess,
    Sink,
    audit_records,
    catalog,
    send_datasets,
    tool,
    with_alerts,
)
from tests.runtime.test_dicomweb import stow
from tests.runtime.test_orthanc_dicomweb import OrthancFactory, orthanc_for  # noqa: F401


def records(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return sorted(audit_records(gateway), key=lambda r: str(r["time"]))


def written(gateway: GatewayProcess) -> str:
    """The trail as it is kept: the day files' text, or the table's rows in order."""
    with catalog(gateway) as opened:
        if opened.backend == "postgresql":
            return "".join(json.dumps(r) + "\n" for r in audit_records(gateway))
    return "".join(p.read_text() for p in sorted((gateway.hot / "audit").glob("*.jsonl")))


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
    text = written(gateway)
    for ds in (ct[0], xray):
        for value in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)):
            assert value not in text
    with catalog(gateway) as opened:
        # On PostgreSQL the site's trail is its table (written by every receiver process
        # of the gateway, as its role): no file is written beside the catalog.
        assert (gateway.hot / "audit").exists() == (opened.backend == "sqlite")
    # Append-only: never rewritten (one more request only adds).
    before = written(gateway)
    gateway.get("/studies")
    after = written(gateway)
    assert after.startswith(before) and len(after) > len(before)


def test_audit_records_body_sizes_and_bounded_escaped_query_keys(
    gateway: GatewayProcess,
) -> None:
    """Issue 25 item 13: bytes are the body's size for JSON answers too; a query key name
    is the client's text, so it is cut short and escaped; values are never written."""
    assert send_datasets(gateway, list(synthetic.ct_series(n_slices=2, size=16, seed=43))) == [0, 0]
    url = f"{gateway.url}/studies"
    searched = httpx.get(url, headers=gateway.auth, timeout=10)
    assert searched.status_code == 200 and len(searched.content) > 100
    missing = httpx.get(f"{url}/1.2.3/metadata", headers=gateway.auth, timeout=10)
    assert missing.status_code == 404
    # Kept under aiohttp's 8190-byte request line: a longer one is refused before any
    # handler runs (and never reaches the log). The worklist takes no such parameters.
    hostile = "X\n{}\x00\u2028" * 300  # 6.6 KB percent-encoded
    worklist = f"{gateway.url}/worklist"
    keyed = httpx.get(
        worklist,
        params=[(hostile, "value-is-phi-1234"), ("PatientID", "phi-5678")],
        headers=gateway.auth,
        timeout=10,
    )
    assert keyed.status_code == 400
    many = [(f"k{i:03}", "v") for i in range(100)]
    assert httpx.get(worklist, params=many, headers=gateway.auth, timeout=10).status_code == 400

    (search,) = [r for r in records(gateway) if r.get("route") == "/studies"]
    assert search["bytes"] == len(searched.content)
    (missed,) = [r for r in records(gateway) if r.get("route") == "/studies/{study}/metadata"]
    assert missed["bytes"] == len(missing.content) > 0
    log = [r for r in records(gateway) if r.get("route") == "/worklist"]
    assert [r["status"] for r in log] == [400, 400]
    keys = log[0]["queryKeys"]
    assert keys[0] == "PatientID"
    assert len(keys[1]) <= MAX_KEY_CHARS + 3 and keys[1].endswith("...")
    assert keys[1].startswith("X\\n{}\\x00\\u2028X\\n")
    assert log[1]["queryKeys"] == [f"k{i:03}" for i in range(MAX_QUERY_KEYS)]
    assert log[1]["queryKeysOmitted"] == 100 - MAX_QUERY_KEYS
    text = written(gateway)
    assert "phi-1234" not in text and "phi-5678" not in text
    assert all(len(line) < 4096 for line in text.splitlines())


def test_critical_alert_says_where_the_study_and_worklist_are(
    start_gateway: GatewayFactory, sink: Sink
) -> None:
    """Issue 25 item 13: the webhook's `study` and `worklist` were null (no publicUrl is
    configured by the operator); they are URLs on the gateway a receiver can fetch."""
    gateway = with_alerts(start_gateway, sink)
    head = list(synthetic.ct_series(n_slices=2, size=16, seed=44))
    study = str(head[0].StudyInstanceUID)
    assert send_datasets(gateway, head) == [0, 0]
    gateway.wait_for(lambda: len(gateway.get("/jobs")) == 1)
    claimed = gateway.post(
        "/jobs/claim", {"model": "ct-head-hyperdensity", "owner": "w", "leaseSeconds": 60}
    )
    assert claimed.status_code == 200, claimed.text
    job = claimed.json()
    finding = {"label": "hyperdensity", "score": 0.99, "critical": True}
    done = gateway.post(
        f"/jobs/{job['id']}/complete", {"token": job["lease"]["token"], "findings": [finding]}
    )
    assert done.status_code == 200, done.text
    gateway.wait_for(lambda: len(sink.received) == 1)
    _, alert = sink.received[0]
    assert alert["study"] == f"{gateway.url}/studies/{study}"
    assert alert["worklist"] == f"{gateway.url}/worklist"
    series = httpx.get(f"{alert['study']}/series", headers=gateway.auth, timeout=10)
    assert series.status_code == 200 and len(series.json()) == 1
    listed = httpx.get(alert["worklist"], headers=gateway.auth, timeout=10).json()
    assert listed[0]["studyUid"] == study and listed[0]["priority"] == "stat"
