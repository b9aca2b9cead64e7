"""The worker's side of a gateway's HTTP API: the job calls and the DICOMweb it needs, with
the site's bearer token (re-read from its file on every call, so a rotated Secret is
picked up without a restart)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
from pydantic import BaseModel

from telerad.api.config import GatewayEndpoint
from telerad.api.jobs import (
    JOB_HEADER,
    LEASE_NOT_HELD,
    ClaimRequest,
    CompleteRequest,
    ExtendRequest,
    FailRequest,
    Finding,
    Job,
)
from telerad.runtime.dicomweb import client

# Job calls are small; a gateway that does not answer one in this time is treated as down
# (the session's own timeout is for moving whole studies).
API_TIMEOUT_S = 30.0


class GatewayError(Exception):
    """A gateway answered other than the API says it should, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class LeaseLost(GatewayError):
    """The job is no longer leased to this worker (expired and claimed by another)."""


def session(endpoint: GatewayEndpoint, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A session for one gateway: its HTTPS certificate checked against its CA, when the
    endpoint names one, for the job calls and DICOMweb alike."""
    context: ssl.SSLContext | bool = True
    if endpoint.ca_file is not None:
        context = ssl.create_default_context(cafile=str(endpoint.ca_file))
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=context))


class Gateway:
    def __init__(self, endpoint: GatewayEndpoint, session: aiohttp.ClientSession) -> None:
        self.site = endpoint.site
        self.url = str(endpoint.url).rstrip("/")
        self._endpoint = endpoint
        self._session = session

    def headers(self, job: Job | None = None) -> dict[str, str]:
        out = {}
        if self._endpoint.token_file is not None:
            try:
                token = self._endpoint.token_file.read_text().strip()
            except OSError as exc:
                raise GatewayError(f"site {self.site}: token file unreadable: {exc}") from None
            out["Authorization"] = f"Bearer {token}"
        if job is not None and job.lease is not None:
            out[JOB_HEADER] = f"{job.id}:{job.lease.token}"
        return out

    async def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        *,
        longer: float = 0,
        **params: str,
    ) -> Any:
        try:
            async with self._session.request(
                method,
                f"{self.url}{path}",
                json=body.model_dump(mode="json", by_alias=True) if body else None,
                params=params or None,
                headers=self.headers(),
                timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S + longer, sock_connect=5),
            ) as answer:
                if answer.status == 204:
                    return None
                payload = await answer.json(content_type=None)
                if answer.status == 409:
                    raise LeaseLost(str(payload.get("detail", "lease lost")), 409)
                if answer.status != 200:
                    detail = payload.get("detail") if isinstance(payload, dict) else None
                    raise GatewayError(
                        f"site {self.site}: {method} {path} answered {answer.status}: {detail}",
                        answer.status,
                    )
                return payload
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise GatewayError(f"site {self.site}: {method} {path} failed: {exc!r}") from None

    async def head(self, model: str) -> Job | None:
        """The job a claim would get now, without claiming it."""
        jobs = await self._call("GET", "/jobs", claimable="true", model=model, limit="1")
        return Job.model_validate(jobs[0]) if jobs else None

    async def claim(
        self, model: str, owner: str, lease_seconds: int, *, wait: int = 0
    ) -> Job | None:
        """The most urgent waiting job, leased; with `wait`, the gateway answers as soon as
        one is queued within that many seconds."""
        request = ClaimRequest(model=model, owner=owner, lease_seconds=lease_seconds)
        extra = {"wait": str(wait)} if wait else {}
        job = await self._call("POST", "/jobs/claim", request, longer=wait, **extra)
        return None if job is None else Job.model_validate(job)

    def _token(self, job: Job) -> str:
        if job.lease is None:
            raise LeaseLost(f"job {job.id} has no lease")
        return job.lease.token

    async def extend(self, job: Job, lease_seconds: int) -> None:
        body = ExtendRequest(token=self._token(job), lease_seconds=lease_seconds)
        await self._call("POST", f"/jobs/{job.id}/extend", body)

    async def complete(self, job: Job, findings: list[Finding]) -> Job:
        body = CompleteRequest(token=self._token(job), findings=findings)
        return Job.model_validate(await self._call("POST", f"/jobs/{job.id}/complete", body))

    async def fail(self, job: Job, reason: str, retryable: bool) -> Job:
        body = FailRequest(token=self._token(job), reason=reason[:1024], retryable=retryable)
        return Job.model_validate(await self._call("POST", f"/jobs/{job.id}/fail", body))

    @contextlib.contextmanager
    def _dicomweb(self, what: str) -> Iterator[None]:
        """DICOMweb failures as this module's errors; 412 means the lease is gone."""
        try:
            yield
        except (client.RetrieveError, client.StowError) as exc:
            if exc.status == LEASE_NOT_HELD:
                raise LeaseLost(str(exc), exc.status) from None
            raise GatewayError(str(exc), exc.status) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(f"site {self.site}: {what} failed: {exc!r}") from None

    async def fetch(self, job: Job) -> list[bytes]:
        """The job's study through WADO-RS (de-identified by the gateway when the job
        says so: the job header tells it which job asks)."""
        with self._dicomweb("WADO-RS"):
            return await client.retrieve(
                self._session, self.url, job.study_uid, headers=self.headers(job)
            )

    async def store(self, job: Job, part10: bytes) -> None:
        """STOW-RS the result into the job's study; every instance must be stored."""
        with self._dicomweb("STOW-RS"):
            report = await client.store(
                self._session,
                self.url,
                [part10],
                study_uid=job.study_uid,
                headers=self.headers(job),
            )
        if report.failed or not report.stored:
            reasons = ", ".join(f"0x{reason:04X}" for _, reason in report.failed)
            raise GatewayError(f"site {self.site}: the result was refused ({reasons})")
