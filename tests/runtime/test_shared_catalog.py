"""One PostgreSQL catalog shared: by two gateway processes of one site (issue 17's
acceptance), by two sites kept apart by row-level security, and through an outage of the
database itself. PostgreSQL only: an SQLite catalog is one gateway's own file."""

from __future__ import annotations

import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import psycopg
import pydicom
import pytest
from psycopg import sql
from pynetdicom import AE

from telerad import synthetic
from telerad.api.config import CatalogConfig
from telerad.api.site import Completion
from telerad.runtime.dataset import StoreStatus
from telerad.runtime.gateway.example import CT_HEAD
from tests.conftest import CatalogFactory
from tests.postgres import PostgresServer

from .conftest import (
    GatewayFactory,
    GatewayProcess,
    audit_records,
    dataset_bytes,
    retrieved,
    send_datasets,
    sop_uid,
    stored,
)
from .conftest import storescu as send_all
from .test_crash import acknowledged
from .test_crash import storescu as streaming
from .test_load import all_jobs

COMPLETED = "telerad_gateway_studies_completed_total"
CT_TRANSFER = "1.2.840.10008.1.2.1"


@pytest.fixture
def new_catalog(postgres: PostgresServer) -> CatalogFactory:
    """Every gateway here on the session's PostgreSQL, each given a fresh database unless
    the test shares one (this overrides the suite's choice of backend)."""

    def database() -> CatalogConfig:
        created = postgres.create_database(f"t{secrets.token_hex(6)}")
        return CatalogConfig(url=created.url, password_file=created.password_file)

    return database


def same_site(start_gateway: GatewayFactory, first: GatewayProcess) -> GatewayProcess:
    """A second gateway of `first`'s site: its database and its tiers (the same hot and
    warm directories), its own DICOM and HTTP ports, tokens and process."""
    return start_gateway(
        site=first.config.site,
        completion=first.config.completion,
        catalog=first.config.catalog,
        storage={
            "hot_dir": first.hot,
            "warm_dir": first.config.storage.warm_dir,
            "encryption": first.config.storage.encryption,
            "sweep_grace_seconds": None,  # a shared catalog's default
        },
    )


def study_jobs(gateway: GatewayProcess, study: str) -> dict[str, int]:
    """Jobs of `study` per model, as the gateway's job API lists them."""
    counts: dict[str, int] = {}
    for job in all_jobs(gateway):
        if job["studyUid"] == study:
            counts[job["model"]] = counts.get(job["model"], 0) + 1
    return counts


def listed(gateway: GatewayProcess, study: str) -> set[str]:
    """SOP Instance UIDs that QIDO-RS lists for `study`, both ways of asking."""
    by_path = gateway.get(f"/studies/{study}/instances", limit=1000)
    by_key = gateway.get("/instances", StudyInstanceUID=study, limit=1000)
    found = {str(i["00080018"]["Value"][0]) for i in by_path}
    assert found == {str(i["00080018"]["Value"][0]) for i in by_key}
    assert len(by_path) == len(found), "an instance listed twice"
    return found


def completions(*gateways: GatewayProcess) -> float:
    return sum(g.metric(COMPLETED) for g in gateways)


def settle() -> None:
    """Long enough for every gateway's completion sweep (once a second) to run again, so
    that a second completion of a study, were one coming, would have happened."""
    time.sleep(3)


# -- two gateways, one site --------------------------------------------------------------


def test_a_study_sent_half_to_each_gateway_of_a_site_completes_once(
    start_gateway: GatewayFactory,
) -> None:
    a = start_gateway(completion=Completion(quiet_seconds=2))
    b = same_site(start_gateway, a)
    ct = list(synthetic.ct_series(n_slices=40, size=64, seed=1701))
    study = str(ct[0].StudyInstanceUID)
    sops = {str(ds.SOPInstanceUID) for ds in ct}
    # Interleaved, so both gateways write the study's rows at the same time.
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(send_datasets, (a, b), (ct[0::2], ct[1::2])))
    assert statuses == [[0] * 20, [0] * 20]

    a.wait_for(lambda: completions(a, b) >= 1)
    settle()
    # Both gateways sweep the same catalog every second; completion is a compare-and-set
    # on the study's round and state, so whichever came second found nothing to do.
    assert (a.metric(COMPLETED), b.metric(COMPLETED)) in ((1, 0), (0, 1))
    assert study_jobs(a, study) == study_jobs(b, study) == {CT_HEAD.name: 1}
    assert all_jobs(a) == all_jobs(b)
    assert listed(a, study) == listed(b, study) == sops


@pytest.mark.reliability(
    "fault", "kill -9 of one of two gateways sharing a PostgreSQL catalog mid-transfer"
)
@pytest.mark.timeout(300)
def test_one_of_two_gateways_killed_mid_transfer_the_other_serves_everything_acknowledged(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A sender streams half a study to each gateway; one dies mid-transfer. The other
    serves every instance either acknowledged, byte for byte; the sender that lost its
    gateway sends its half again to the survivor (as it would through the site's Service),
    and the study completes once, with one job per model."""
    # The quiet window must outlast the check of every acknowledged instance below (a
    # hundred retrieves, seconds on a loaded machine): were it shorter, the survivor would
    # complete the half it has and then, rightly, again once the rest came.
    survivor = start_gateway(completion=Completion(quiet_seconds=15))
    victim = same_site(start_gateway, survivor)
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=160, size=256, seed=1702), tmp_path / "ct"
    )
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    mine, theirs = files[0::2], files[1::2]
    to_survivor, to_victim = streaming(survivor, mine), streaming(victim, theirs)
    assert to_victim.stdout is not None
    lines: list[str] = []
    for line in to_victim.stdout:
        lines.append(line)
        if len(acknowledged(lines)) >= 20:
            victim.kill()
            break
    lines += to_victim.stdout.readlines()
    to_victim.wait(60)
    survivor_output, _ = to_survivor.communicate(timeout=120)
    assert to_survivor.returncode == 0, survivor_output[-2000:]
    acked = acknowledged(survivor_output.splitlines()) + acknowledged(lines)
    acked_by_victim = acknowledged(lines)
    assert 20 <= len(acked_by_victim) < len(theirs), "the kill must land mid-transfer"
    assert to_victim.returncode != 0, "the sender must notice its gateway died"
    assert len(acked) == len(mine) + len(acked_by_victim)

    for path in acked:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        served = retrieved(survivor, study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        assert served == dataset_bytes(path)[1], f"{path.name} differs"

    assert survivor.metric(COMPLETED) == 0, "the check outlasted the quiet window"
    send_all(survivor, theirs)
    survivor.wait_for(lambda: survivor.metric(COMPLETED) >= 1)
    settle()
    assert survivor.metric(COMPLETED) == 1
    assert study_jobs(survivor, study) == {CT_HEAD.name: 1}
    assert listed(survivor, study) == {sop_uid(p) for p in files}


# -- two sites, one database ----------------------------------------------------------------

PARAMETER = re.compile(r"\{(\w+)\}")
# What each job operation takes, so that it gets past validation to the job's lookup.
JOB_BODIES: dict[str, dict[str, Any]] = {
    "extend": {"leaseSeconds": 30},
    "complete": {"findings": []},
    "fail": {"reason": "tried from another site"},
}


def test_two_sites_on_one_database_see_nothing_of_each_other(
    start_gateway: GatewayFactory, postgres: PostgresServer
) -> None:
    quick = Completion(quiet_seconds=1)
    a = start_gateway(site="site-a", completion=quick)
    b = start_gateway(site="site-b", completion=quick, catalog=a.config.catalog)
    assert a.hot != b.hot
    ct_a = list(synthetic.ct_series(n_slices=4, size=32, seed=1703))
    ct_b = list(synthetic.ct_series(n_slices=4, size=32, seed=1704))
    assert send_datasets(a, ct_a, ae_title="PYNETDICOM") == [0] * 4
    assert send_datasets(b, ct_b, ae_title="STORESCU") == [0] * 4
    study_a, study_b = str(ct_a[0].StudyInstanceUID), str(ct_b[0].StudyInstanceUID)
    a.wait_for(lambda: study_jobs(a, study_a) == {CT_HEAD.name: 1})
    b.wait_for(lambda: study_jobs(b, study_b) == {CT_HEAD.name: 1})

    # Each site claims its own job, and then nothing: the other's stays where it is.
    leases: dict[str, dict[str, Any]] = {}
    for me, other in ((a, b), (b, a)):
        (their_job,) = all_jobs(other)
        claim = me.post("/jobs/claim", {"model": CT_HEAD.name, "owner": "w"})
        assert claim.status_code == 200, claim.text
        leases[me.config.site] = claim.json()
        assert me.post("/jobs/claim", {"model": CT_HEAD.name, "owner": "w"}).status_code == 204
        assert other.get(f"/jobs/{their_job['id']}")["state"] == their_job["state"]
    assert leases["site-a"]["studyUid"] == study_a and leases["site-b"]["studyUid"] == study_b
    assert leases["site-a"]["id"] != leases["site-b"]["id"]

    for me, other, mine, theirs, their_ds, caller in (
        (a, b, study_a, study_b, ct_b[0], "PYNETDICOM"),
        (b, a, study_b, study_a, ct_a[0], "STORESCU"),
    ):
        their_job = leases[other.config.site]
        assert [s["0020000D"]["Value"] for s in me.get("/studies")] == [[mine]]
        assert me.get("/studies", StudyInstanceUID=theirs) == []
        assert me.get(f"/studies/{theirs}/instances") == []
        assert me.get("/instances", StudyInstanceUID=theirs) == []
        assert me.get("/series", StudyInstanceUID=theirs) == []
        assert [e["studyUid"] for e in me.get("/worklist")] == [mine]
        assert [j["studyUid"] for j in all_jobs(me)] == [mine]
        ids = {
            "job": str(their_job["id"]),
            "study": theirs,
            "series": str(their_ds.SeriesInstanceUID),
            "instance": str(their_ds.SOPInstanceUID),
        }
        assert every_operation(me, ids, their_job["lease"]["token"]) >= 15
        # Still leased where it belongs: nothing tried here reached it.
        assert other.get(f"/jobs/{their_job['id']}")["state"] == "leased"
        # The audit trail is the database's `audit` table, and no API serves it: read
        # as the gateway's own role, bound to its site, it holds this site's sender's
        # association only.
        audited = {r.get("calling") for r in audit_records(me) if r.get("event") == "association"}
        assert audited == {caller}
    # Both sites' records are in that one table: each site sees exactly its own.
    database = urlsplit(a.config.catalog.url or "").path.removeprefix("/")
    with psycopg.connect(postgres.admin_url, dbname=database) as admin:
        rows = dict(admin.execute("SELECT site, count(*) FROM audit GROUP BY site").fetchall())
    assert rows == {"site-a": len(audit_records(a)), "site-b": len(audit_records(b))}
    assert min(rows.values()) > 15


def every_operation(gateway: GatewayProcess, ids: dict[str, str], token: str) -> int:
    """Every operation the gateway describes that names a job, study, series or instance,
    tried with the other site's (and its lease, in the body and the Telerad-Job header):
    each is refused or finds nothing. Returns how many requests were made."""
    paths = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()["paths"]
    tried = 0
    for path, item in paths.items():
        names = PARAMETER.findall(path)
        if not names:
            continue
        concrete = PARAMETER.sub(lambda m: ids.get(m.group(1), "1"), path)
        body: dict[str, Any] = {"token": token, **JOB_BODIES.get(path.rsplit("/", 1)[-1], {})}
        for method in sorted(set(item) & {"get", "post", "put", "delete", "patch"}):
            for job_header in ({}, {"Telerad-Job": f"{ids['job']}:{token}"}):
                answer = httpx.request(
                    method.upper(),
                    f"{gateway.url}{concrete}",
                    headers={**gateway.auth, "Accept": "*/*", **job_header},
                    json=body,
                    timeout=30,
                )
                what = (method, path, job_header, answer.status_code, answer.text[:300])
                if "job" in names:
                    # Not 409 (lease lost) either: that would say the job exists.
                    assert answer.status_code == 404, what
                else:
                    assert 400 <= answer.status_code < 500 or answer.json() == [], what
                tried += 1
    return tried


# -- the database down ----------------------------------------------------------------------


def test_a_request_whose_audit_record_cannot_be_written_is_not_answered_as_done(
    start_gateway: GatewayFactory, postgres: PostgresServer
) -> None:
    """The audit table refusing the gateway's records (its INSERT revoked by hand): every
    HTTP request is answered 503 instead of its outcome; a DICOM store is still
    acknowledged (the instance is durable; only the association's record, written once
    it ended, is lost, and the gateway logs that); once the table takes records again,
    requests are answered again."""
    gateway = start_gateway()
    assert gateway.get("/worklist") == []
    database = urlsplit(gateway.config.catalog.url or "").path.removeprefix("/")
    role = sql.Identifier(database)  # tests/postgres.py names the owner as its database

    def privilege(statement: str) -> None:
        with psycopg.connect(postgres.admin_url, dbname=database, autocommit=True) as admin:
            admin.execute(sql.SQL(statement).format(role))

    privilege("REVOKE INSERT ON audit FROM {}")
    for method, path, body in (
        ("GET", "/worklist", None),
        ("POST", "/jobs/claim", {"model": CT_HEAD.name, "owner": "w"}),
    ):
        answer = httpx.request(
            method, f"{gateway.url}{path}", json=body, headers=gateway.auth, timeout=10
        )
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["title"] == "Audit trail unavailable"
    ct = list(synthetic.ct_series(n_slices=2, size=32, seed=1705))
    assert send_datasets(gateway, ct) == [0, 0]
    gateway.wait_for(
        lambda: "an association's audit record was not written" in gateway.log.read_text()
    )
    assert "permission denied for table audit" in gateway.log.read_text()

    privilege("GRANT INSERT ON audit TO {}")
    assert len(gateway.get("/studies")) == 1
    assert [r["route"] for r in audit_records(gateway) if "route" in r] == [
        "/worklist",
        "/studies",
    ]


OUTAGE_S = 10
ANSWER_TIMEOUT_S = 30
"""How long a sender waits for each answer: past the catalog's own wait for a connection
(10 s), so a store the gateway never answers shows as such."""


@dataclass
class Attempt:
    sop: str
    sent: float
    answered: float
    status: int | None
    """None: no response (the association ended first, or the answer never came)."""


@dataclass
class Senders:
    """Modalities sending small studies, one association per study, and what each store
    was answered (times are time.monotonic(), for ordering only)."""

    gateway: GatewayProcess
    attempts: list[Attempt] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        number = 0
        while not self.stop.is_set():
            seed = 1_000_000 + 1000 * index + number
            study = list(synthetic.ct_series(n_slices=6, size=32, seed=seed))
            number += 1
            ae = AE(ae_title="PYNETDICOM")
            ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = ANSWER_TIMEOUT_S
            ae.add_requested_context(str(study[0].SOPClassUID), CT_TRANSFER)
            assoc = ae.associate("127.0.0.1", self.gateway.port, ae_title=self.gateway.ae_title)
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            for ds in study:
                if self.stop.is_set() or not assoc.is_established:
                    break
                sent = time.monotonic()
                answer = assoc.send_c_store(ds)
                status = int(answer.Status) if "Status" in answer else None
                with self.lock:
                    self.attempts.append(
                        Attempt(str(ds.SOPInstanceUID), sent, time.monotonic(), status)
                    )
            if assoc.is_established:
                assoc.release()

    def since(self, after: float) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.sent >= after]


def stored_status(status: int | None) -> bool:
    """Success, or a warning (0xBxxx): both store the instance."""
    return status is not None and (status == StoreStatus.SUCCESS or status >> 12 == 0xB)


def resumed(attempts: list[Attempt], run: int = 20) -> bool:
    """The last `run` stores all succeeded (the gateway's receiver processes take
    associations in turn: each of them is catalogued again)."""
    return len(attempts) >= run and all(stored_status(a.status) for a in attempts[-run:])


@pytest.mark.reliability("fault", "PostgreSQL stopped for 10 s under load")
@pytest.mark.timeout(300)
def test_postgresql_stopped_for_10_s_under_load(
    start_gateway: GatewayFactory, postgres: PostgresServer
) -> None:
    """Three senders store while PostgreSQL is stopped, down 10 s, and started again.
    Down, every store is refused with a status (none is told it is stored, none waits
    unanswered) and the gateway stays up, saying its catalog is unavailable; back, every
    store ever acknowledged is catalogued and searchable, and stores succeed again without
    a restart of the gateway."""
    gateway = start_gateway()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    senders = Senders(gateway)
    threads = [threading.Thread(target=senders.run, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    probes: list[tuple[str, float, httpx.Response]] = []
    checking = threading.Event()

    def probe() -> None:
        """The pod's probes, answered while the catalog is gone: /readyz and /livez at
        once, /healthz (which asks the catalog) once the catalog gives up waiting for a
        connection."""
        while checking.is_set():
            for path in ("/readyz", "/livez", "/healthz"):
                answer = httpx.get(f"{gateway.url}{path}", timeout=ANSWER_TIMEOUT_S)
                probes.append((path, time.monotonic(), answer))
            time.sleep(0.2)

    checker = threading.Thread(target=probe, daemon=True)
    try:
        gateway.wait_for(lambda: len([a for a in senders.since(0) if a.status == 0]) >= 30)
        postgres.stop()
        # From here until the start, the server is gone (pg_ctl waited for its exit).
        down = time.monotonic()
        checking.set()
        checker.start()
        for _ in range(OUTAGE_S):
            time.sleep(1)
            assert gateway.proc.poll() is None, gateway.log_tail()
        back = time.monotonic()
        checking.clear()
    finally:
        if not postgres.running:
            postgres.start()
    checker.join(ANSWER_TIMEOUT_S)
    try:
        gateway.wait_for(lambda: resumed(senders.since(back)), timeout=120)
    finally:
        senders.stop.set()
        for thread in threads:
            thread.join(2 * ANSWER_TIMEOUT_S)
    assert gateway.proc.poll() is None and gateway.proc.pid == pid, "the gateway restarted"

    # Whenever sent, a store answered while the server was gone was not catalogued.
    while_down = [a for a in senders.since(0) if down <= a.answered <= back]
    assert while_down, "no store was answered while PostgreSQL was down"
    assert not [a for a in while_down if stored_status(a.status)], "stored without a catalog"
    unanswered = [a for a in senders.since(0) if a.status is None]
    assert not unanswered, f"{len(unanswered)} stores got no status"
    # The HTTP port kept answering; what it said while down, it said truly.
    answered = {(path, r.status_code) for path, at, r in probes if at <= back}
    assert answered >= {("/readyz", 200), ("/livez", 200)}, answered
    # A restart would not bring the database back: the liveness probe never fails for it.
    assert ("/livez", 503) not in answered, answered
    assert [r for path, _, r in probes if path == "/healthz"], "/healthz never answered"
    said = {
        (r.status_code, r.json()["checks"]["catalog"])
        for path, at, r in probes
        if path == "/healthz" and at <= back
    }
    assert said <= {(503, False)}, said
    gateway.wait_for(
        lambda: httpx.get(f"{gateway.url}/healthz", timeout=ANSWER_TIMEOUT_S).status_code == 200
    )

    acknowledged_sops = {a.sop for a in senders.since(0) if stored_status(a.status)}
    catalogued = {v.sop_uid for v in stored(gateway)}
    lost = acknowledged_sops - catalogued
    assert not lost, f"{len(lost)} acknowledged stores not catalogued"
    searchable = {
        str(i["00080018"]["Value"][0])
        for offset in range(0, len(catalogued), 1000)
        for i in gateway.get("/instances", limit=1000, offset=offset)
    }
    assert acknowledged_sops <= searchable


@pytest.mark.reliability("fault", "PostgreSQL restarted while the gateway is idle")
def test_the_first_stores_after_a_postgresql_restart_succeed(
    start_gateway: GatewayFactory, postgres: PostgresServer
) -> None:
    """Connections the pools hold across a restart of the server are dead: each receiver
    process must replace its own before using it, not fail the next store with it."""
    gateway = start_gateway()
    ct = list(synthetic.ct_series(n_slices=12, size=32, seed=1705))
    # One association per instance: each receiver process takes some of them, so each
    # pool holds connections when the server goes.
    assert [send_datasets(gateway, [ds]) for ds in ct[:6]] == [[0]] * 6
    try:
        postgres.stop()
    finally:
        postgres.start()
    assert [send_datasets(gateway, [ds]) for ds in ct[6:]] == [[0]] * 6
    assert {v.sop_uid for v in stored(gateway)} == {str(ds.SOPInstanceUID) for ds in ct}
