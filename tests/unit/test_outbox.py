"""A job's result and what it causes, in one process on a real catalog: the SR stored under
the lease does not re-open its study; completion writes alerts and exports to the outbox
in the same transaction; deliveries back off, park, and keep one idempotency key."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from telerad.api.config import CatalogConfig
from telerad.api.jobs import Finding, Job, JobState
from telerad.api.site import Destination, DicomWebPeer, Notifications, Webhook
from telerad.api.types import Priority
from telerad.runtime.dataset import StoreStatus
from telerad.runtime.gateway import outbox
from telerad.runtime.gateway.example import example_config
from telerad.runtime.store.catalog import Delivery, DeliveryKind
from tests.unit.test_runtime_store import CT, CT_CLASS, EXPLICIT, Site, _encode, store_bytes

HOOKS = Notifications(
    webhooks=[
        Webhook(name="on-call", url="http://127.0.0.1:9/alerts"),
        Webhook(name="ward", url="http://127.0.0.1:9/ward", min_priority=Priority.URGENT),
    ]
)
GATEWAY = "http://127.0.0.1:9"
PACS = Destination(name="pacs", dicomweb=DicomWebPeer(url="http://127.0.0.1:9/dicom-web"))


@pytest.fixture
def site(tmp_path: Path, catalog_config: CatalogConfig) -> Site:
    site = Site(tmp_path, catalog_config)
    site.config = site.config.model_copy(update={"notifications": HOOKS, "destinations": [PACS]})
    site.flow.config = site.config
    return site


LEASES = {DeliveryKind.ALERT: 60.0, DeliveryKind.EXPORT: 60.0}


def claimed(site: Site, now: float) -> list[Delivery]:
    """What a sender would take at `now` (each taken then for a minute)."""
    return site.catalog.claim_deliveries("test-sender", now, 10, LEASES)


def store(site: Site, study: str, result_of: int | None = None) -> str:
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study])  # one series per study
    ds.SOPInstanceUID = generate_uid()
    ds.BodyPartExamined = "HEAD"  # what the example's stat CT head rule asks for
    outcome = store_bytes(
        site.ingest, _encode(ds), EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X", result_of=result_of
    )
    assert outcome.status == StoreStatus.SUCCESS
    return str(ds.SOPInstanceUID)


def completed_job(site: Site) -> tuple[str, int, str]:
    study = generate_uid()
    for _ in range(3):
        store(site, study)
    later = time.time() + 3600  # past the quiet time, without waiting for it
    assert site.flow.complete_due(later) == 1
    job = site.catalog.claim("ct-head-hyperdensity", "w", 60, later)
    assert job is not None and job.lease is not None
    return study, job.id, job.lease.token


def store_result(site: Site, study: str, job_id: int) -> str:
    return store(site, study, result_of=job_id)


def test_a_result_joins_its_study_without_re_opening_it(site: Site) -> None:
    study, job_id, _ = completed_job(site)
    sop = store_result(site, study, job_id)
    assert site.catalog.due_studies(time.time() + 3600) == []
    assert [r.sop_uid for r in site.catalog.results(job_id)] == [sop]
    # A late image, unlike a result, re-opens the study.
    store(site, study)
    assert site.catalog.due_studies(time.time() + 3600) == [study]


def test_a_critical_completion_queues_alerts_and_exports_in_one_step(site: Site) -> None:
    study, job_id, token = completed_job(site)
    store_result(site, study, job_id)
    finding = Finding(label="hyperdensity", score=0.97, critical=True)
    site.flow.complete(job_id, token, [finding], "https://gw.example:8080/")
    due = claimed(site, time.time())
    kinds = sorted((d.kind, d.target) for d in due)
    # The example's head CT rule is stat, which every webhook's lowest priority admits.
    assert kinds == [
        (DeliveryKind.ALERT, "on-call"),
        (DeliveryKind.ALERT, "ward"),
        (DeliveryKind.EXPORT, "pacs"),
    ]
    alert = json.loads(next(d.payload for d in due if d.target == "on-call"))
    assert alert["studyInstanceUID"] == study and alert["priority"] == "stat"
    assert alert["findings"][0]["label"] == "hyperdensity"
    # Where the receiver finds the study and the worklist (no trailing slash doubled).
    assert alert["study"] == f"https://gw.example:8080/studies/{study}"
    assert alert["worklist"] == "https://gw.example:8080/worklist"
    # No patient data in the alert, only the UID that finds the study.
    raw = json.dumps(alert)
    ds = pydicom.dcmread(CT)
    assert str(ds.PatientName) not in raw and str(ds.PatientID) not in raw


@pytest.mark.parametrize(
    ("priority", "alerted"),
    [
        (Priority.STAT, ["stat", "urgent", "routine"]),
        (Priority.URGENT, ["urgent", "routine"]),
        (Priority.ROUTINE, ["routine"]),
    ],
)
def test_an_alert_goes_to_the_webhooks_whose_lowest_priority_the_job_reaches(
    tmp_path: Path, priority: Priority, alerted: list[str]
) -> None:
    hooks = [
        Webhook(name=p.value, url=f"http://127.0.0.1:9/{p.value}", min_priority=p) for p in Priority
    ]
    # A webhook that names no priority hears every critical finding, a routine rule's too.
    hooks.append(Webhook(name="default", url="http://127.0.0.1:9/default"))
    alerted = [*alerted, "default"]
    config = example_config(11112, 8080, tmp_path).model_copy(
        update={"notifications": Notifications(webhooks=hooks), "destinations": [PACS]}
    )
    now = datetime.now(UTC)
    job = Job(
        id=1,
        study_uid="1.2.3",
        model="ct-head-hyperdensity",
        priority=priority,
        state=JobState.DONE,
        attempts=1,
        max_attempts=5,
        rule="example/head-ct",
        deidentify=False,
        notify=True,
        created_at=now,
        updated_at=now,
        critical=True,
    )
    planned = outbox.plan(config, job, GATEWAY)
    assert [d.target for d in planned if d.kind == DeliveryKind.ALERT] == alerted
    assert [d.target for d in planned if d.kind == DeliveryKind.EXPORT] == ["pacs"]


def test_two_senders_never_hold_one_delivery_and_a_restart_takes_its_own_back(
    site: Site,
) -> None:
    _, job_id, token = completed_job(site)
    site.flow.complete(job_id, token, [Finding(label="x", score=1.0, critical=True)], GATEWAY)
    now = time.time()
    first = site.catalog.claim_deliveries("gw-a:8080", now, 2, LEASES)
    second = site.catalog.claim_deliveries("gw-b:8080", now, 10, LEASES)
    assert len(first) == 2 and len(second) == 1
    assert not {d.id for d in first} & {d.id for d in second}
    assert site.catalog.claim_deliveries("gw-b:8080", now + 1, 10, LEASES) == []
    # The leases run out (A died, B hung): what A held goes to B, with B's own.
    late = site.catalog.claim_deliveries("gw-b:8080", now + 61, 10, LEASES)
    assert {d.id for d in late} == {d.id for d in first + second}
    # B starts again before its leases end: what it held is due at once, for anyone.
    assert site.catalog.release_deliveries("gw-b:8080", now + 62) == 3
    assert len(site.catalog.claim_deliveries("gw-a:8080", now + 62, 10, LEASES)) == 3
    site.catalog.delivered(first[0].id, now + 63)
    assert site.catalog.release_deliveries("gw-a:8080", now + 63) == 2


def test_a_quiet_completion_exports_but_does_not_alert(site: Site) -> None:
    _, job_id, token = completed_job(site)
    site.flow.complete(job_id, token, [Finding(label="hyperdensity", score=0.1)], GATEWAY)
    due = claimed(site, time.time())
    assert [(d.kind, d.target) for d in due] == [(DeliveryKind.EXPORT, "pacs")]


def test_failed_deliveries_back_off_then_park_with_one_key(site: Site) -> None:
    _, job_id, token = completed_job(site)
    site.flow.complete(job_id, token, [Finding(label="x", score=1.0, critical=True)], GATEWAY)
    (alert,) = [d for d in claimed(site, time.time()) if d.target == "on-call"]
    now = time.time()
    site.catalog.delivery_failed(alert.id, "503", now + 60, now)
    assert all(d.id != alert.id for d in claimed(site, now + 1))
    (again,) = [d for d in claimed(site, now + 61) if d.id == alert.id]
    assert again.key == alert.key and again.attempts == 1
    site.catalog.delivery_failed(alert.id, "503", None, now)
    assert all(d.id != alert.id for d in claimed(site, now + 10**6))
    assert site.catalog.delivery_states()[("alert", "parked")] == 1


def test_keys_differ_between_catalogs(tmp_path: Path) -> None:
    one, two = Site(tmp_path / "a"), Site(tmp_path / "b")
    assert one.catalog.instance_id != two.catalog.instance_id


def test_signature_covers_time_and_body() -> None:
    header = outbox.sign("k", "1700000000", b'{"a":1}')
    expected = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert outbox.sign("k", "1700000001", b'{"a":1}') != header
