"""What re-opens a completed study, and what follows when it is read again: a crash never
makes half a study look complete, a second result says it replaces the first, the worklist
and alerts follow the newest result, and a reader's report routes nothing."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from telerad import synthetic
from telerad.api.config import CompiledRule
from telerad.api.routing import Match
from telerad.api.site import Completion, Destination, DicomWebPeer
from telerad.api.types import Priority
from telerad.runtime.gateway.example import CT_HEAD, example_config
from telerad.runtime.results import sr

from .conftest import (
    GatewayFactory,
    GatewayProcess,
    Sink,
    age_studies,
    done_jobs,
    results,
    send_datasets,
    stow,
    tool,
    with_alerts,
)
from .test_jobs import claim
from .test_orthanc_dicomweb import OrthancFactory, orthanc_for  # noqa: F401
from .test_worker import retrieve, uid

QUIET_S = 8
"""Long enough that a restarted gateway takes the rest of the study well inside it."""


def entry(gateway: GatewayProcess, study: str) -> dict[str, Any]:
    (found,) = [e for e in gateway.get("/worklist") if e["studyUid"] == study]
    return found


def jobs_of(gateway: GatewayProcess, study: str) -> list[dict[str, Any]]:
    return [j for j in gateway.get("/jobs") if j["studyUid"] == study]


def complete(gateway: GatewayProcess, job: dict[str, Any], *findings: dict[str, Any]) -> None:
    body = {"token": job["lease"]["token"], "findings": list(findings)}
    answer = gateway.post(f"/jobs/{job['id']}/complete", body)
    assert answer.status_code == 200, answer.text


@pytest.mark.reliability(
    "fault", "kill -9 mid-study, restart: the study waits a fresh quiet window"
)
def test_a_study_cut_by_a_crash_waits_a_fresh_quiet_window_after_the_restart(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(completion=Completion(quiet_seconds=QUIET_S))
    datasets = list(synthetic.ct_series(n_slices=40, size=32, seed=51))
    study = str(datasets[0].StudyInstanceUID)
    assert send_datasets(gateway, datasets[:15]) == [0] * 15
    gateway.kill()
    # Down for an hour: its quiet time passes while no sender can reach it.
    age_studies(gateway, 3600)

    gateway.start()
    assert entry(gateway, study)["complete"] is False, "completed with what came before the crash"
    assert send_datasets(gateway, datasets[15:]) == [0] * 25
    gateway.wait_for(lambda: entry(gateway, study)["complete"], timeout=60)
    (job,) = jobs_of(gateway, study)
    assert entry(gateway, study)["instances"] == 40
    assert "complete (40 instances)" in gateway.log.read_text()
    assert gateway.metric("telerad_gateway_studies_reopened_total") == 0
    assert job["state"] == "queued"


def test_a_study_read_again_gets_a_result_that_replaces_the_first(
    start_gateway: GatewayFactory,
    start_worker: Any,
    orthanc_for: OrthancFactory,  # noqa: F811
    sink: Sink,
    tmp_path: Path,
) -> None:
    orthanc = orthanc_for(None, dicom=False)
    pacs = Destination(name="pacs", dicomweb=DicomWebPeer(url=f"{orthanc.url}/dicom-web"))
    gateway = with_alerts(start_gateway, sink, destinations=[pacs])
    start_worker(gateway)
    routine = list(synthetic.ct_series(n_slices=30, size=128, seed=21))
    study = str(routine[0].StudyInstanceUID)
    assert send_datasets(gateway, routine) == [0] * 30
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 1, timeout=60)
    assert entry(gateway, study)["critical"] is False
    # A late series re-opens the study; the model reads it again and finds the bleed.
    bleed = synthetic.ct_series(
        n_slices=60, size=256, seed=22, hyperdensity=True, study_uid=study, series_number=2
    )
    assert send_datasets(gateway, list(bleed)) == [0] * 60
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 2, timeout=90)
    first, second = sorted(done_jobs(gateway), key=lambda j: j["id"])
    assert (first["critical"], second["critical"]) == (False, True)

    def report(job: dict[str, Any]) -> pydicom.Dataset:
        sop = str(sr.result_uid(f"example/{job['id']}/{study}", "instance"))
        (item,) = [r for r in results(gateway, study) if uid(r, "00080018") == sop]
        return retrieve(gateway, study, uid(item, "0020000E"), sop)

    earlier, newer = report(first), report(second)
    assert "PredecessorDocumentsSequence" not in earlier
    (predecessor,) = newer.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == earlier.SOPClassUID
    path = tmp_path / "newer.dcm"
    newer.save_as(path, enforce_file_format=True)
    check = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True)  # noqa: PLW1510
    assert [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line] == []

    # The worklist and the alert follow the newest result.
    assert entry(gateway, study)["critical"] is True
    assert entry(gateway, study)["priority"] == "stat"
    gateway.wait_for(lambda: gateway.metric("telerad_gateway_deliveries_total", kind="alert") == 1)
    ((_, alert),) = sink.received
    assert alert["job"] == second["id"]
    # The PACS gets each result once; the newer one names the one it replaces there too.
    gateway.wait_for(
        lambda: gateway.metric("telerad_gateway_outbox", kind="export", state="delivered") == 2
    )
    theirs = orthanc.files()
    assert set(theirs) == {earlier.SOPInstanceUID, newer.SOPInstanceUID}
    forwarded = pydicom.dcmread(io.BytesIO(theirs[newer.SOPInstanceUID]))
    assert forwarded.PredecessorDocumentsSequence == newer.PredecessorDocumentsSequence
    assert gateway.metric("telerad_gateway_outbox", kind="export") == 2


def test_a_newer_result_without_a_finding_lowers_the_worklist_and_alerts_nothing(
    start_gateway: GatewayFactory, sink: Sink
) -> None:
    gateway = with_alerts(start_gateway, sink)
    datasets = list(synthetic.ct_series(n_slices=3, size=32, seed=53))
    study = str(datasets[0].StudyInstanceUID)
    assert send_datasets(gateway, datasets[:2]) == [0, 0]
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 1)
    job = claim(gateway, CT_HEAD.name, "worker-a")
    assert job is not None
    complete(gateway, job, {"label": "hyperdensity", "score": 0.95, "critical": True})
    assert entry(gateway, study)["critical"] is True
    gateway.wait_for(lambda: len(sink.received) == 1)

    assert send_datasets(gateway, datasets[2:]) == [0]
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 2)
    again = claim(gateway, CT_HEAD.name, "worker-a")
    assert again is not None and again["id"] != job["id"]
    complete(gateway, again)
    assert entry(gateway, study)["critical"] is False
    assert entry(gateway, study)["priority"] == "stat"  # the rule's own priority
    assert [alert["job"] for _, alert in sink.received] == [job["id"]]


def test_a_result_older_than_the_newest_alerts_nothing(
    start_gateway: GatewayFactory, sink: Sink
) -> None:
    """The first job finishes last: the study was re-opened and read again meanwhile."""
    gateway = with_alerts(start_gateway, sink)
    datasets = list(synthetic.ct_series(n_slices=2, size=32, seed=54))
    study = str(datasets[0].StudyInstanceUID)
    assert send_datasets(gateway, datasets[:1]) == [0]
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 1)
    slow = claim(gateway, CT_HEAD.name, "worker-a")
    assert send_datasets(gateway, datasets[1:]) == [0]
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 2)
    fast = claim(gateway, CT_HEAD.name, "worker-b")
    assert slow is not None and fast is not None and fast["id"] > slow["id"]
    complete(gateway, fast)
    complete(gateway, slow, {"label": "hyperdensity", "score": 0.95, "critical": True})
    assert entry(gateway, study)["critical"] is False
    # A critical result on another study, after it: once its alert is in, any alert the
    # outdated result had written would have been sent too.
    (other,) = synthetic.ct_series(n_slices=1, size=32, seed=55)
    assert send_datasets(gateway, [other]) == [0]
    gateway.wait_for(lambda: len(jobs_of(gateway, str(other.StudyInstanceUID))) == 1)
    sentinel = claim(gateway, CT_HEAD.name, "worker-a")
    assert sentinel is not None
    complete(gateway, sentinel, {"label": "hyperdensity", "score": 0.95, "critical": True})
    gateway.wait_for(
        lambda: (
            bool(sink.received)
            and gateway.metric("telerad_gateway_outbox", kind="alert", state="pending") == 0
        )
    )
    assert [alert["job"] for _, alert in sink.received] == [sentinel["id"]]


def reader_report(image: Dataset) -> bytes:
    """A Basic Text SR as a viewer saves it into the study it reports on."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, image.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        setattr(ds, keyword, image.get(keyword, ""))
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 99, 1
    ds.Manufacturer = "VIEWER"
    ds.ContentDate, ds.ContentTime = "20250101", "120000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Report"
    ds.ConceptNameCodeSequence = [title]
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = [title]
    finding.TextValue = "No acute intracranial abnormality."
    ds.ContentSequence = [finding]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def sentinel_completed(gateway: GatewayProcess, seed: int) -> None:
    """Send another study and wait until it is complete: by then every completion pass
    that could take a study re-opened before it has run (studies complete oldest first)."""
    other = list(synthetic.ct_series(n_slices=1, size=32, seed=seed))
    assert send_datasets(gateway, other) == [0]
    gateway.wait_for(lambda: entry(gateway, str(other[0].StudyInstanceUID))["complete"])


def completed_and_read(gateway: GatewayProcess, seed: int) -> tuple[Dataset, dict[str, Any]]:
    """A CT head study, complete, its job done (by hand, through the job API)."""
    (image,) = synthetic.ct_series(n_slices=1, size=32, seed=seed)
    assert send_datasets(gateway, [image]) == [0]
    study = str(image.StudyInstanceUID)
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 1)
    job = claim(gateway, CT_HEAD.name, "worker-a")
    assert job is not None and job["studyUid"] == study
    complete(gateway, job)
    return image, job


def test_a_report_saved_from_a_viewer_does_not_route_the_study_again(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(completion=Completion(quiet_seconds=1))
    image, _ = completed_and_read(gateway, seed=61)
    study = str(image.StudyInstanceUID)
    answer = stow(gateway, [reader_report(image)], f"/studies/{study}")
    assert answer.status_code == 200, answer.text
    sentinel_completed(gateway, seed=62)
    assert entry(gateway, study)["complete"] is True
    assert [j["state"] for j in jobs_of(gateway, study)] == ["done"]
    assert gateway.metric("telerad_gateway_studies_reopened_total") == 0
    assert entry(gateway, study)["instances"] == 2  # the report is kept, in the study


def test_a_rule_that_asks_for_reports_routes_them(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    reports = CompiledRule(
        policy="example",
        name="reader-reports",
        match=Match(sop_classes=[BasicTextSRStorage]),
        models=[CT_HEAD],
        priority=Priority.ROUTINE,
    )
    gateway = start_gateway(
        completion=Completion(quiet_seconds=1),
        routing=[reports, *example_config(1, 1, tmp_path).routing],
    )
    image, first = completed_and_read(gateway, seed=63)
    study = str(image.StudyInstanceUID)
    answer = stow(gateway, [reader_report(image)], f"/studies/{study}")
    assert answer.status_code == 200, answer.text
    gateway.wait_for(lambda: len(jobs_of(gateway, study)) == 2)
    (again,) = [j for j in jobs_of(gateway, study) if j["id"] != first["id"]]
    assert again["rule"] == "example/reader-reports" and again["state"] == "queued"
    assert gateway.metric("telerad_gateway_studies_reopened_total") == 1
