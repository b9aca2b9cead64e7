"""The inference worker as a real process beside a real gateway: studies sent with dcmtk's
storescu, the SR checked with dicom3tools' dciodvfy, the alert received by a webhook
server the test runs, the result forwarded to Orthanc. Workers and gateways are killed
with SIGKILL mid-way, and every job and alert is accounted for once."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from telerad import synthetic
from telerad.api.config import Completion, DeliveryPolicy
from telerad.api.site import (
    Destination,
    DicomPeer,
    DicomWebPeer,
    Notifications,
    Webhook,
)
from telerad.api.types import Priority
from telerad.runtime.gateway.example import example_config
from telerad.runtime.models import base, volume
from telerad.runtime.results import sr
from tests.runtime.conftest import (
    GatewayFactory,
    GatewayProcess,
    Sink,
    TlsMaterial,
    audit_records,
    done_jobs,
    results,
    storescu,
    tool,
    with_alerts,
)
from tests.runtime.test_orthanc_dicomweb import OrthancFactory, orthanc_for  # noqa: F401


def retrieve(gateway: GatewayProcess, study: str, series: str, instance: str) -> pydicom.Dataset:
    response = httpx.get(
        f"{gateway.url}/studies/{study}/series/{series}/instances/{instance}",
        headers={**gateway.auth, "Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert response.status_code == 200
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1]
    return pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]))


def uid(item: dict[str, Any], tag: str) -> str:
    return str(item[tag]["Value"][0])


def test_a_ct_head_with_a_bleed_gets_an_sr_stat_priority_and_one_alert(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    gateway = with_alerts(start_gateway, sink)
    worker = start_worker(gateway)
    routine = synthetic.ct_series(n_slices=30, size=128, seed=21)
    bleed = list(synthetic.ct_series(n_slices=60, size=256, seed=22, hyperdensity=True))
    study_uid = str(bleed[0].StudyInstanceUID)
    storescu(gateway, synthetic.write_series(routine, tmp_path / "routine"))
    storescu(gateway, synthetic.write_series(bleed, tmp_path / "bleed"))
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 2, timeout=60)

    # The SR is in the same study, valid, and points at the right images.
    (item,) = results(gateway, study_uid)
    report = retrieve(gateway, study_uid, uid(item, "0020000E"), uid(item, "00080018"))
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    check = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    errors = [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line]
    assert errors == []
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.StudyInstanceUID == study_uid
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in bleed}
    text = str(report)
    assert "ct-head-hyperdensity" in text and "1.0.0" in text
    # The outline is on a slice through the bleed (the middle slice +- 12 mm).
    near = {str(ds.SOPInstanceUID) for ds in bleed[30 - 4 : 30 + 5]}
    regions = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in _walk(report.ContentSequence)
        if item.ValueType == "IMAGE"
    ]
    assert regions and set(regions) <= near

    # Findings, stat priority, first on the worklist, no re-routing because of the SR.
    job = next(j for j in done_jobs(gateway) if j["studyUid"] == study_uid)
    assert job["critical"] is True and job["findings"][0]["label"] == "hyperdensity"
    assert job["findings"][0]["measurements"]["volume_ml"] > 5
    worklist = gateway.get("/worklist")
    assert worklist[0]["studyUid"] == study_uid and worklist[0]["priority"] == "stat"
    assert worklist[0]["critical"] is True
    assert len(gateway.get("/jobs")) == 2
    assert gateway.metric("telerad_gateway_studies_reopened_total") == 0

    # Exactly one alert, for the critical study only, with the idempotency key.
    gateway.wait_for(lambda: len(sink.received) >= 1)
    time.sleep(1)
    assert len(sink.received) == 1
    headers, alert = sink.received[0]
    assert alert["studyInstanceUID"] == study_uid and alert["priority"] == "stat"
    assert alert["findings"][0]["critical"] is True
    assert headers["Idempotency-Key"]
    assert gateway.metric("telerad_gateway_deliveries_total", kind="alert", result="delivered") == 1

    # No GPU here: the worker says it runs on the CPU.
    metrics = worker.metrics()
    assert "telerad_gpu_available 0.0" in metrics
    assert 'telerad_worker_device{device="cpu",model="ct-head-hyperdensity"} 1.0' in metrics
    assert 'telerad_worker_jobs_total{model="ct-head-hyperdensity",result="done"} 2.0' in metrics
    # Patient names and IDs appear in no log.
    for log in (gateway.log, worker.log):
        content = log.read_text()
        assert str(bleed[0].PatientName) not in content
        assert str(bleed[0].PatientID) not in content
        assert study_uid not in content


def test_an_alert_goes_only_to_the_webhooks_whose_lowest_priority_it_reaches(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    # Head CTs routed as urgent: a bleed alerts the urgent webhook, not the stat-only one.
    routing = [
        rule.model_copy(update={"priority": Priority.URGENT})
        for rule in example_config(1, 1, tmp_path).routing
    ]
    webhooks = [
        Webhook(name="stat-only", url=f"{sink.url}/stat", min_priority=Priority.STAT),
        Webhook(name="urgent", url=f"{sink.url}/urgent", min_priority=Priority.URGENT),
        Webhook(name="all", url=f"{sink.url}/routine", min_priority=Priority.ROUTINE),
    ]
    gateway = start_gateway(
        completion=Completion(quiet_seconds=1),
        notifications=Notifications(webhooks=webhooks),
        routing=routing,
    )
    start_worker(gateway)
    bleed = synthetic.ct_series(n_slices=60, size=256, seed=22, hyperdensity=True)
    storescu(gateway, synthetic.write_series(bleed, tmp_path / "bleed"))
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 1, timeout=60)
    (job,) = done_jobs(gateway)
    assert job["critical"] is True and job["priority"] == "urgent"
    # Alerts are planned together at completion: one for the stat-only webhook would have
    # come along with these two.
    gateway.wait_for(lambda: len(sink.received) >= 2)
    time.sleep(1)
    assert sorted(sink.paths) == ["/alerts/routine", "/alerts/urgent"]
    assert gateway.metric("telerad_gateway_deliveries_total", kind="alert", result="delivered") == 2


def _walk(items: Any) -> Iterator[Any]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_a_worker_reaches_an_https_gateway_with_its_ca(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tls: TlsMaterial, tmp_path: Path
) -> None:
    gateway = with_alerts(start_gateway, sink, tls=tls.server_files(mutual=False))
    assert gateway.url.startswith("https://")
    start_worker(gateway)
    study = synthetic.ct_series(n_slices=20, size=128, seed=26, hyperdensity=True)
    files = synthetic.write_series(study, tmp_path / "ct")
    tls_args = ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca)]
    command = [tool("storescu"), *tls_args, "-aet", "STORESCU", "-aec", gateway.ae_title]
    command += ["127.0.0.1", str(gateway.port), *map(str, files)]
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 1, timeout=60)
    gateway.wait_for(lambda: len(sink.received) == 1)


def test_chest_x_rays_real_and_synthetic(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    gateway = with_alerts(start_gateway, sink)
    start_worker(gateway, "cxr-opacity")
    real = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    sick = synthetic.chest_xray(seed=9, size=(1024, 1024), opacity=True)
    files = [Path(get_testdata_file("RG1_UNCR.dcm"))]
    files += synthetic.write_series([sick], tmp_path / "sick")
    storescu(gateway, files)
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 2, timeout=60)
    # The example's chest rule de-identifies, so jobs name their studies by pseudonyms.
    jobs = done_jobs(gateway)
    assert {j["studyUid"] for j in jobs}.isdisjoint({real.StudyInstanceUID, sick.StudyInstanceUID})
    clear, found = sorted(jobs, key=lambda j: len(j["findings"]))
    assert clear["findings"] == []
    (finding,) = found["findings"]
    assert finding["label"] == "opacity" and finding["score"] > 0.9
    # The results are stored under the original studies, with their identity.
    for original in (real, sick):
        (item,) = results(gateway, str(original.StudyInstanceUID))
        report = retrieve(
            gateway, str(original.StudyInstanceUID), uid(item, "0020000E"), uid(item, "00080018")
        )
        assert report.PatientID == original.PatientID
        assert report.PatientName == original.PatientName


@pytest.mark.reliability("fault", "kill -9 of a worker mid-inference")
def test_worker_killed_mid_job_the_job_completes_once(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    gateway = with_alerts(start_gateway, sink)
    first = start_worker(gateway)
    study = list(synthetic.ct_series(n_slices=200, size=512, seed=23, hyperdensity=True))
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(lambda: any(j["state"] == "leased" for j in gateway.get("/jobs")), 30)
    first.kill()  # while it fetches or runs the model: 200 slices of 512x512 take seconds
    assert done_jobs(gateway) == []
    start_worker(gateway)
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 1, timeout=90)
    (job,) = gateway.get("/jobs")
    assert job["attempts"] == 2
    assert len(results(gateway, str(study[0].StudyInstanceUID))) == 1
    gateway.wait_for(lambda: len(sink.received) == 1)
    time.sleep(1)
    assert len(sink.received) == 1


@pytest.mark.reliability("fault", "kill -9 of the gateway with a critical alert pending")
def test_gateway_killed_with_an_alert_pending_delivers_it_once(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    sink.refusing = True
    gateway = with_alerts(start_gateway, sink, delivery=DeliveryPolicy(backoff_seconds=1))
    start_worker(gateway)
    study = synthetic.ct_series(n_slices=30, size=128, seed=24, hyperdensity=True)
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(lambda: sink.refused >= 2, timeout=60)
    gateway.kill()
    sink.refusing = False
    gateway.start()
    gateway.wait_for(lambda: len(sink.received) == 1)
    time.sleep(2)
    assert len(sink.received) == 1
    assert gateway.metric("telerad_gateway_outbox", kind="alert", state="delivered") == 1
    attempts = [r for r in audit_records(gateway) if r.get("event") == "delivery"]
    assert [a["result"] for a in attempts if a["kind"] == "alert"][-1] == "delivered"
    assert len({a["key"] for a in attempts if a["kind"] == "alert"}) == 1


@pytest.mark.parametrize("protocol", ["stow-rs", "c-store"])
def test_results_are_forwarded_to_orthanc(  # noqa: PLR0917  (fixtures)
    protocol: str,
    start_gateway: GatewayFactory,
    start_worker: Any,
    orthanc_for: OrthancFactory,  # noqa: F811
    sink: Sink,
    tmp_path: Path,
) -> None:
    orthanc = orthanc_for(None, dicom=True)
    destination = (
        Destination(name="pacs", dicomweb=DicomWebPeer(url=f"{orthanc.url}/dicom-web"))
        if protocol == "stow-rs"
        else Destination(
            name="pacs",
            dicom=DicomPeer(host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC"),
        )
    )
    gateway = with_alerts(start_gateway, sink, destinations=[destination])
    start_worker(gateway)
    study = list(synthetic.ct_series(n_slices=20, size=128, seed=25, hyperdensity=True))
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(
        lambda: gateway.metric("telerad_gateway_outbox", kind="export", state="delivered") == 1,
        timeout=60,
    )
    (item,) = results(gateway, str(study[0].StudyInstanceUID))
    ours = retrieve(
        gateway, str(study[0].StudyInstanceUID), uid(item, "0020000E"), uid(item, "00080018")
    )
    theirs = orthanc.files()
    assert list(theirs) == [ours.SOPInstanceUID]  # the SR only, not the images
    copy = pydicom.dcmread(io.BytesIO(theirs[ours.SOPInstanceUID]))
    assert copy.StudyInstanceUID == ours.StudyInstanceUID
    assert copy.ContentSequence == ours.ContentSequence


@pytest.mark.reliability(
    "fault", "destination PACS down for a while (Orthanc stopped, then started)"
)
def test_an_export_waits_out_a_dead_destination_and_is_delivered_once(
    start_gateway: GatewayFactory,
    start_worker: Any,
    orthanc_for: OrthancFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    orthanc = orthanc_for(None)
    orthanc.stop()
    destination = Destination(name="pacs", dicomweb=DicomWebPeer(url=f"{orthanc.url}/dicom-web"))
    retry = DeliveryPolicy(backoff_seconds=1, max_backoff_seconds=2)
    gateway = start_gateway(
        completion=Completion(quiet_seconds=1), destinations=[destination], delivery=retry
    )
    start_worker(gateway)
    study = list(synthetic.ct_series(n_slices=20, size=128, seed=26, hyperdensity=True))
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))

    def tries(result: str) -> float:
        return gateway.metric("telerad_gateway_deliveries_total", kind="export", result=result)

    gateway.wait_for(lambda: tries("retry") >= 3, timeout=60)  # the PACS is down: it retries
    orthanc.start()
    gateway.wait_for(lambda: tries("delivered") == 1, timeout=60)
    time.sleep(3)  # a second delivery, if there were one, would have gone by now
    assert tries("delivered") == 1
    assert tries("parked") == 0
    (item,) = results(gateway, str(study[0].StudyInstanceUID))
    assert list(orthanc.files()) == [uid(item, "00080018")]  # the SR, nothing else


def parts(response: httpx.Response) -> list[bytes]:
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    chunks = response.content.split(f"--{boundary}".encode())[1:-1]
    return [c.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for c in chunks]


def identifiers(ds: pydicom.Dataset) -> set[str]:
    """Every value of the original that identifies the patient, the study or the place:
    names, IDs, dates and UIDs (but the standard's own, such as SOP classes)."""
    keywords = {"PatientID", "AccessionNumber", "StudyID", "InstitutionName", "StationName"}
    found = set()
    for element in [*ds.file_meta, *ds.iterall()]:
        if not element.value or element.VR == "SQ":
            continue
        standard = str(element.value).startswith("1.2.840.10008.")
        if (
            element.VR in ("PN", "DA", "DT")
            or element.keyword in keywords
            or (element.VR == "UI" and not standard)
        ):
            found.add(str(element.value))
    return found


def test_a_de_identifying_rule_serves_a_copy_and_restores_the_result(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    original = synthetic.chest_xray(seed=31, size=(512, 512), opacity=True)
    original.InstitutionName = "ST MARYS HOSPITAL"
    original.ReferringPhysicianName = "HOUSE^GREGORY"
    storescu(gateway, synthetic.write_series([original], tmp_path / "cxr"))
    secrets = identifiers(original)
    assert str(original.PatientName) in secrets and str(original.StudyInstanceUID) in secrets

    # The worker's side, by hand: what a claim, a fetch and a store show it.
    gateway.wait_for(lambda: len(gateway.get("/jobs")) == 1, timeout=30)
    claimed = gateway.post("/jobs/claim", {"model": "cxr-opacity", "owner": "vendor"}).json()
    assert claimed["deidentify"] is True
    pseudonym = claimed["studyUid"]
    assert pseudonym not in secrets
    lease = {**gateway.auth, "Telerad-Job": f"{claimed['id']}:{claimed['lease']['token']}"}
    fetched = httpx.get(
        f"{gateway.url}/studies/{pseudonym}",
        headers={**lease, "Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert fetched.status_code == 200
    (copy_bytes,) = parts(fetched)
    for secret in secrets:
        assert secret.encode() not in copy_bytes, secret
    copy = pydicom.dcmread(io.BytesIO(copy_bytes))
    assert identifiers(copy).isdisjoint(secrets)
    assert copy.StudyInstanceUID == pseudonym and copy.PatientIdentityRemoved == "YES"
    assert "Content-Location" not in fetched.text[:2000]
    # The original study is not reachable under the pseudonym without the lease.
    assert httpx.get(f"{gateway.url}/studies/{pseudonym}", headers=gateway.auth).status_code == 404

    # The model's result, made from the copy only, comes back as the original study's.
    study = volume.assemble(pseudonym, [copy])
    model = base.load("cxr-opacity", "cpu")
    report = sr.build(
        model.predict(study), list(study.series[0].images), model=model.name,
        version=model.version, job_key=f"example/{claimed['id']}/{pseudonym}",
    )  # fmt: skip
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    stored = httpx.post(
        f"{gateway.url}/studies/{pseudonym}",
        content=multipart_body(buffer.getvalue()),
        headers={**lease, "Content-Type": MULTIPART, "Accept": "application/dicom+json"},
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    assert str(original.StudyInstanceUID) not in stored.text
    (item,) = results(gateway, str(original.StudyInstanceUID))
    kept = retrieve(
        gateway, str(original.StudyInstanceUID), uid(item, "0020000E"), uid(item, "00080018")
    )
    assert kept.PatientName == original.PatientName and kept.PatientID == original.PatientID
    assert kept.AccessionNumber == original.AccessionNumber
    assert "PatientIdentityRemoved" not in kept
    evidence = kept.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == original.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == original.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    pseudonyms = {str(copy.StudyInstanceUID), str(copy.SeriesInstanceUID), str(copy.SOPInstanceUID)}
    assert pseudonyms.isdisjoint(str(e.value) for e in kept.iterall())
    assert kept.StudyDate == original.StudyDate


MULTIPART = 'multipart/related; type="application/dicom"; boundary=telerad-test'


def multipart_body(part10: bytes) -> bytes:
    head = b"--telerad-test\r\nContent-Type: application/dicom\r\n\r\n"
    return head + part10 + b"\r\n--telerad-test--\r\n"


@pytest.mark.reliability("attack", "a third-party worker offered an identified study")
def test_a_third_party_worker_refuses_a_study_that_is_not_de_identified(
    start_gateway: GatewayFactory, start_worker: Any, sink: Sink, tmp_path: Path
) -> None:
    # The example's head CT rule does not de-identify and its model is not marked
    # third-party: a worker that is, sent there by mistake, parks the job unread.
    gateway = with_alerts(start_gateway, sink)
    start_worker(gateway, third_party=True)
    study = synthetic.ct_series(n_slices=10, size=64, seed=27)
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(lambda: any(j["state"] == "parked" for j in gateway.get("/jobs")))
    (job,) = gateway.get("/jobs")
    assert "de-identified" in job["reason"]
    fetched = [r for r in audit_records(gateway) if r.get("method") == "GET"]
    assert not any(r["route"] == "/studies/{study}" for r in fetched)
