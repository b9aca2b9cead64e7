"""From a completed study to jobs, and the job API workers use: priorities, leases that
expire and are claimed again, completion at most once, retries and parking, the worklist."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from telerad.api.config import JobPolicy
from telerad.api.site import Completion
from telerad.runtime.gateway.deid import Deidentifier

from .conftest import ON_DISK, GatewayFactory, GatewayProcess, send_datasets

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def study(n: int, *, modality: str, body_part: str, study_uid: str | None = None) -> list[Dataset]:
    """`n` instances of one study, made from CT_small with fresh UIDs."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality, ds.BodyPartExamined, ds.InstanceNumber = modality, body_part, i + 1
        out.append(ds)
    return out


def claim(
    gateway: GatewayProcess, model: str, owner: str, lease: int = 60
) -> dict[str, Any] | None:
    response = gateway.post("/jobs/claim", {"model": model, "owner": owner, "leaseSeconds": lease})
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def quick(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway(
        completion=Completion(quiet_seconds=1),
        jobs=JobPolicy(max_attempts=2, backoff_seconds=0),
    )


def test_completed_studies_become_the_jobs_their_rules_call_for(quick: GatewayProcess) -> None:
    gateway = quick
    head = study(3, modality="CT", body_part="HEAD")
    chest = study(1, modality="DX", body_part="CHEST")
    knee = study(2, modality="MR", body_part="KNEE")
    assert send_datasets(gateway, head + chest + knee) == [0] * 6
    gateway.wait_for(
        lambda: (
            len(gateway.get("/jobs")) == 2
            and gateway.metric("telerad_gateway_studies_completed_total") == 3
        )
    )
    jobs = {j["model"]: j for j in gateway.get("/jobs")}
    assert jobs["ct-head-hyperdensity"]["priority"] == "stat"
    assert jobs["ct-head-hyperdensity"]["studyUid"] == head[0].StudyInstanceUID
    assert jobs["cxr-opacity"]["priority"] == "urgent"
    assert jobs["cxr-opacity"]["deidentify"] is True
    assert gateway.metric("telerad_queue_depth", model="ct-head-hyperdensity", priority="stat") == 1
    assert gateway.metric("telerad_queue_depth", model="cxr-opacity", priority="stat") == 0
    worklist = gateway.get("/worklist")
    assert [e["studyUid"] for e in worklist] == [
        head[0].StudyInstanceUID,
        chest[0].StudyInstanceUID,
        knee[0].StudyInstanceUID,
    ]
    assert worklist[2]["priority"] is None and worklist[2]["jobs"] == []

    # A late instance re-opens the study; once quiet again it is routed again, and the
    # model gets a second job only because its first one has been taken already.
    first = claim(gateway, "ct-head-hyperdensity", "worker-a")
    assert first is not None
    late = study(1, modality="CT", body_part="HEAD", study_uid=head[0].StudyInstanceUID)
    assert send_datasets(gateway, late) == [0]
    gateway.wait_for(lambda: gateway.metric("telerad_gateway_studies_completed_total") == 4)
    assert gateway.metric("telerad_gateway_studies_reopened_total") == 1
    ct_jobs = gateway.get("/jobs", model="ct-head-hyperdensity")
    assert [j["state"] for j in ct_jobs] == ["leased", "queued"]
    head_entry = gateway.get("/worklist")[0]
    assert head_entry["instances"] == 4


def test_leases_expire_and_completion_happens_once(quick: GatewayProcess) -> None:
    gateway = quick
    head = study(1, modality="CT", body_part="HEAD")
    chest = study(1, modality="CR", body_part="CHEST")
    assert send_datasets(gateway, chest + head) == [0, 0]
    gateway.wait_for(lambda: len(gateway.get("/jobs")) == 2)

    # A worker claims and vanishes: once its lease runs out, another claims the same job.
    lost = claim(gateway, "ct-head-hyperdensity", "worker-a", lease=1)
    assert lost is not None and lost["attempts"] == 1
    assert claim(gateway, "ct-head-hyperdensity", "worker-b") is None
    time.sleep(1.2)
    assert gateway.metric("telerad_queue_depth", model="ct-head-hyperdensity") == 1
    job = claim(gateway, "ct-head-hyperdensity", "worker-b")
    assert job is not None and job["id"] == lost["id"] and job["attempts"] == 2
    assert job["lease"]["owner"] == "worker-b"

    stale = gateway.post(f"/jobs/{job['id']}/complete", {"token": lost["lease"]["token"]})
    assert stale.status_code == 409
    extended = gateway.post(
        f"/jobs/{job['id']}/extend", {"token": job["lease"]["token"], "leaseSeconds": 120}
    )
    assert extended.status_code == 200
    assert extended.json()["lease"]["expiresAt"] > job["lease"]["expiresAt"]
    finding = {"label": "hyperdensity", "score": 0.93, "measurements": {"volume_ml": 12.5}}
    done = gateway.post(
        f"/jobs/{job['id']}/complete", {"token": job["lease"]["token"], "findings": [finding]}
    )
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "done" and done.json()["critical"] is True
    again = gateway.post(f"/jobs/{job['id']}/complete", {"token": job["lease"]["token"]})
    assert again.status_code == 409

    # The critical head CT now leads the worklist, ahead of the earlier urgent chest film.
    first = gateway.get("/worklist")[0]
    assert first["studyUid"] == head[0].StudyInstanceUID
    assert first["priority"] == "stat" and first["critical"] is True


def test_failing_jobs_retry_then_park_with_their_reason(quick: GatewayProcess) -> None:
    gateway = quick
    assert send_datasets(gateway, study(1, modality="DX", body_part="CHEST")) == [0]
    gateway.wait_for(lambda: len(gateway.get("/jobs")) == 1)
    for attempt in (1, 2):
        job = claim(gateway, "cxr-opacity", "worker-a")
        assert job is not None and job["attempts"] == attempt
        failed = gateway.post(
            f"/jobs/{job['id']}/fail",
            {"token": job["lease"]["token"], "reason": f"model crashed ({attempt})"},
        )
        assert failed.status_code == 200
    assert failed.json()["state"] == "parked"
    assert failed.json()["reason"] == "model crashed (2)"
    assert claim(gateway, "cxr-opacity", "worker-a") is None
    parked = gateway.get("/jobs", state="parked")
    assert [j["id"] for j in parked] == [job["id"]]
    assert gateway.metric("telerad_gateway_jobs", model="cxr-opacity", state="parked") == 1


def test_bad_requests_say_what_was_wrong(gateway: GatewayProcess) -> None:
    bad = gateway.post("/jobs/claim", {"model": "Not_A_Label", "owner": "w"})
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert "model" in bad.json()["detail"]
    unknown = gateway.post("/jobs/424242/complete", {"token": "x" * 32})
    assert unknown.status_code == 404
    assert gateway.post("/jobs/claim", {"model": "m", "owner": "w", "extra": 1}).status_code == 400
    lost = httpx.get(f"{gateway.url}/jobs", params={"state": "lost"}, headers=gateway.auth)
    assert lost.status_code == 400


@ON_DISK
def test_different_bytes_under_one_uid_are_kept_as_a_new_version(gateway: GatewayProcess) -> None:
    (original,) = study(1, modality="CT", body_part="HEAD")
    changed = pydicom.dcmread(CT_SMALL)
    for element in original:
        changed[element.tag] = element
    changed.file_meta = original.file_meta
    changed.SeriesDescription = "re-sent after correction"
    assert send_datasets(gateway, [original, original, changed]) == [0, 0, 0]
    files = sorted(p.name for p in (gateway.hot / "studies").rglob("*.dcm"))
    uid = original.SOPInstanceUID
    assert files == [f"{uid}.dcm", f"{uid}.v2.dcm"]
    assert gateway.metric("telerad_gateway_duplicates_total", result="identical") == 1
    assert gateway.metric("telerad_gateway_duplicates_total", result="new-version") == 1
    assert gateway.metric("telerad_gateway_instances_received_total") == 2


def test_gateways_given_one_deidentification_key_file_give_a_study_one_pseudonym(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    # As a site's replicas share the key from its Secret: each would otherwise make its
    # own on its pod's disk, and a worker would see one study under two UIDs.
    key_file = tmp_path / "deid" / "key"
    key_file.parent.mkdir()
    key_file.write_text("ab" * 32 + "\n")
    key_file.chmod(0o400)
    chest = study(1, modality="DX", body_part="CHEST")
    uids = []
    for _ in range(2):
        gateway = start_gateway(
            completion=Completion(quiet_seconds=1), deidentification_key_file=key_file
        )
        assert send_datasets(gateway, chest) == [0]
        gateway.wait_for(lambda g=gateway: len(g.get("/jobs", model="cxr-opacity")) == 1)
        job = claim(gateway, "cxr-opacity", "worker-a")
        assert job is not None and job["deidentify"] is True
        uids.append(job["studyUid"])
        assert not (gateway.config.storage.hot_dir / "deid.key").exists()
    expected = Deidentifier(key_file).pseudonym(chest[0].StudyInstanceUID)
    assert uids == [expected, expected]
    assert expected != chest[0].StudyInstanceUID
