"""A claim that waits (`POST /jobs/claim?wait=S`) answers as soon as a job of its model is
queued: by its own gateway, or, on a shared PostgreSQL catalog, by another gateway of the
site (LISTEN/NOTIFY). Each claim waits 20 s at the gateway while its client gives up after
15: only a wake-up, not the end of the wait, can answer in time."""

from __future__ import annotations

import threading
from typing import Any

import httpx2 as httpx
import pytest

from telerad import synthetic
from telerad.api.config import CatalogConfig, Completion
from telerad.runtime.gateway.example import CT_HEAD
from tests.postgres import PostgresServer

from .conftest import GatewayFactory, GatewayProcess, send_datasets

CLIENT_TIMEOUT_S = 15


class WaitingClaim(threading.Thread):
    """A worker's long poll, in the background."""

    def __init__(self, gateway: GatewayProcess) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.answer: httpx.Response | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.answer = httpx.post(
                f"{self.gateway.url}/jobs/claim",
                params={"wait": "20"},
                json={"model": CT_HEAD.name, "owner": "waiting-worker"},
                headers=self.gateway.auth,
                timeout=CLIENT_TIMEOUT_S,
            )
        except Exception as exc:
            self.error = exc

    def job(self) -> dict[str, Any]:
        self.join(CLIENT_TIMEOUT_S + 5)
        assert self.error is None, f"the waiting claim got no answer: {self.error!r}"
        assert self.answer is not None and self.answer.status_code == 200, self.answer
        job: dict[str, Any] = self.answer.json()
        return job


def ct_head(seed: int) -> list[Any]:
    return list(synthetic.ct_series(n_slices=4, size=32, seed=seed))


def waiting(gateway: GatewayProcess) -> WaitingClaim:
    claim = WaitingClaim(gateway)
    claim.start()
    # The claim is parked at the gateway (nothing was queued yet) before a study arrives.
    gateway.wait_for(lambda: gateway.get("/jobs") == [] and claim.is_alive())
    return claim


def test_a_waiting_claim_gets_the_job_its_gateway_queues(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(completion=Completion(quiet_seconds=1))
    assert gateway.post("/jobs/claim", {"model": CT_HEAD.name, "owner": "w"}).status_code == 204
    claim = waiting(gateway)
    study = ct_head(seed=71)
    assert send_datasets(gateway, study) == [0] * len(study)
    job = claim.job()
    assert job["studyUid"] == str(study[0].StudyInstanceUID)
    assert job["lease"]["owner"] == "waiting-worker"
    (listed,) = gateway.get("/jobs")
    assert listed["state"] == "leased"


@pytest.mark.parametrize("new_catalog", ["postgresql"], indirect=True)
def test_a_waiting_claim_hears_a_job_another_gateway_of_the_site_queued(
    start_gateway: GatewayFactory, postgres: PostgresServer
) -> None:
    database = postgres.create_database("claimwait")
    shared = CatalogConfig(url=database.url, password_file=database.password_file)
    receiving = start_gateway(catalog=shared, completion=Completion(quiet_seconds=1))
    # Another hot tier: the two share the catalog only; the job's study is the first's.
    serving = start_gateway(catalog=shared)
    claim = waiting(serving)
    study = ct_head(seed=72)
    assert send_datasets(receiving, study) == [0] * len(study)
    job = claim.job()
    assert job["studyUid"] == str(study[0].StudyInstanceUID)
    assert [j["id"] for j in receiving.get("/jobs")] == [job["id"]]
