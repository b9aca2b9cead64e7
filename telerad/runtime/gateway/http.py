"""The gateway's HTTP port: DICOMweb, the job API for workers, the worklist, the OpenAPI
description, health, readiness, liveness and metrics.

Handlers only translate: bodies are parsed into the `telerad.api.jobs` models (a bad body
is a 400 naming the field), work happens in `Flow` on a worker thread (SQLite commits
fsync), and every error is an RFC 9457 problem document. Every request but health,
readiness, liveness, metrics and the OpenAPI description needs a bearer token of the site's
tenant, and is written to the audit trail whatever its outcome; one whose record cannot be
written is answered 503 instead of its outcome (whatever it changed stays changed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from telerad.api.config import HttpLimits
from telerad.api.jobs import (
    ClaimRequest,
    CompleteRequest,
    ExportRequest,
    ExtendRequest,
    FailRequest,
    Job,
    JobState,
    Problem,
)
from telerad.runtime import phi
from telerad.runtime.gateway import openapi
from telerad.runtime.gateway.access import Tokens, Verdict, query_keys
from telerad.runtime.gateway.dicomweb import (
    PUBLIC_URL,
    ClientGone,
    DicomWeb,
    DicomWebError,
    Streamed,
    base_url,
)
from telerad.runtime.gateway.exports import Exporter, ExportError
from telerad.runtime.gateway.flow import Flow
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.gateway.pacing import BodyTimeout, paced
from telerad.runtime.gateway.waiters import MAX_WAIT_S, Waiters
from telerad.runtime.store.audit import AuditTrail, AuditUnavailable
from telerad.runtime.store.catalog import LeaseLost, UnknownJob

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The kubelet's probes and Prometheus present no token.
PUBLIC = frozenset({"/healthz", "/readyz", "/livez", "/metrics", "/openapi.json"})
# Path parameters that are UIDs: the audit log keeps only their hashes.
_UID_PARAMS = ("study", "series", "instance")


def problem(status: int, title: str, detail: str) -> web.Response:
    body = Problem(title=title, status=status, detail=detail).to_wire()
    return web.json_response(body, status=status, content_type="application/problem+json")


def _json(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    data: Any = (
        [m.model_dump(mode="json", by_alias=True) for m in model]
        if isinstance(model, list)
        else model.model_dump(mode="json", by_alias=True)
    )
    return web.json_response(data, status=status)


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Problem(400, "Bad request", f"body is not JSON: {exc}") from None
    try:
        return model.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise _Problem(400, "Bad request", f"{where}: {first['msg']}") from None


class _Problem(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.response = problem(status, title, detail)


def _int(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) > maximum:
        raise _Problem(400, "Bad request", f"{name} must be an integer from 0 to {maximum}")
    return int(raw)


def _job_id(request: web.Request) -> int:
    # The route takes at most 18 digits, which SQLite's 64-bit integers hold.
    return int(request.match_info["job"])


def _strict_query(description: dict[str, Any]) -> Middleware:
    """Refuse query parameters an operation does not declare: a misspelt filter must not
    quietly widen what is listed. QIDO-RS checks its own (any attribute may be asked for,
    and the answer names the ones it takes)."""
    declared = openapi.query_parameters(description)

    @web.middleware
    async def strict(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        names = declared.get((request.method, resource.canonical if resource else ""))
        if names is not None:
            unknown = sorted(set(request.query) - names)
            if unknown:
                return problem(400, "Bad request", f"unknown query parameter {unknown[0]!r}")
        return await handler(request)

    return strict


def _route(request: web.Request) -> str:
    """The route a request took, as declared (`/studies/{study}`): its path holds UIDs."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(no route)"


@web.middleware
async def _errors(  # noqa: PLR0911  (one answer per kind of failure)
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Problem as exc:
        return exc.response
    except ClientGone as exc:
        log.info("%s %s: the client left mid-answer", request.method, _route(request))
        return exc.response
    except UnknownJob as exc:
        return problem(404, "Not found", f"no job {exc.args[0]}")
    except LeaseLost as exc:
        return problem(409, "Lease lost", str(exc))
    except DicomWebError as exc:
        response = problem(exc.status, exc.title, exc.detail)
        response.headers.update(exc.headers)
        return await _closing(request, response) if exc.close else response
    except BodyTimeout as exc:
        return await _closing(request, problem(408, "Request timeout", str(exc)))
    except ExportError as exc:
        return problem(
            exc.status, "Export failed" if exc.status >= 500 else "Bad request", str(exc)
        )
    except web.HTTPException as exc:
        # aiohttp's own refusals (no route, wrong method, body too large) as problems too.
        if exc.status < 400:
            raise
        response = problem(exc.status, exc.reason, f"{exc.reason}: {request.method} {request.path}")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("%s %s failed", request.method, _route(request))
        return problem(500, "Internal error", "the gateway failed; see its log")


# Lingering close, as nginx's lingering_time and lingering_timeout: how long the rest of a
# refused body is read and dropped in all, and how long without a byte of it coming.
_LINGER_SECONDS = 2.0
_LINGER_IDLE_SECONDS = 0.5


async def _closing(request: web.Request, response: web.Response) -> web.Response:
    """`response`, sent at once, and the connection closed after it: aiohttp would
    otherwise go on reading (for 10 s) the rest of a body that is broken or not coming.

    Closing a socket with bytes of the body still unread makes the kernel reset the
    connection, and a reset that reaches the client before it read the answer destroys
    the answer. So the write side is shut first (the client sees the answer, then the
    end of the stream) and what the client still sends is dropped until it stops, is
    silent for a while or has had its time; only then is the connection closed."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    transport = request.transport
    if transport is not None:
        if transport.can_write_eof():  # TLS cannot half-close; it still lingers
            transport.write_eof()
        await _linger(transport, request.protocol)
    request.protocol.force_close()
    return response


class _Drain(asyncio.Protocol):
    """Stands in for aiohttp's protocol while a connection lingers: drops what arrives,
    and hands a connection that ends (the transport closes itself at end of stream) back
    to aiohttp, which must hear of it to forget the connection."""

    def __init__(self, owner: asyncio.BaseProtocol) -> None:
        self.owner = owner
        self.ended = False
        self.stirred = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.stirred.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.stirred.set()
        self.owner.connection_lost(exc)


async def _linger(transport: asyncio.Transport, owner: asyncio.BaseProtocol) -> None:
    drain = _Drain(owner)
    transport.set_protocol(drain)
    # aiohttp stops reading when a body's buffer fills, as a refused one's may have.
    transport.resume_reading()
    try:
        async with asyncio.timeout(_LINGER_SECONDS):
            while not drain.ended:
                drain.stirred.clear()
                await asyncio.wait_for(drain.stirred.wait(), _LINGER_IDLE_SECONDS)
    except TimeoutError:
        pass
    finally:
        transport.set_protocol(owner)


def _denial(verdict: Verdict, configured: bool, authorization: str | None) -> web.Response:
    """The same answer whatever was asked for, so it tells nothing about the data."""
    if verdict.status == 403:
        return problem(403, "Forbidden", "this token does not grant access to this site")
    if not configured:
        detail = "this gateway has no client tokens (ImagingSite spec.access)"
    elif authorization:
        detail = "the bearer token is not valid"
    else:
        detail = "a bearer token is required"
    response = problem(401, "Unauthorized", detail)
    challenge = 'Bearer realm="telerad"'
    response.headers["WWW-Authenticate"] = (
        f'{challenge}, error="invalid_token"' if authorization else challenge
    )
    return response


def _measured(metrics: GatewayMetrics) -> Middleware:
    @web.middleware
    async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        response = await handler(request)
        resource = request.match_info.route.resource
        # The route template, never the path: paths carry UIDs.
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http_request(route, request.method, response.status, time.monotonic() - started)
        return response

    return measured


def _access(tokens: Tokens, audit: AuditTrail) -> Middleware:
    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC:
            return await handler(request)
        started = time.monotonic()
        authorization = request.headers.get("Authorization")
        verdict = tokens.check(authorization)
        response: web.StreamResponse
        if verdict.status == 200:
            request["client"] = verdict.client
            response = await handler(request)
        else:
            response = _denial(verdict, tokens.configured, authorization)
        record = _record(request, verdict, response, time.monotonic() - started)
        try:
            await asyncio.to_thread(audit.write, record)
        except AuditUnavailable as exc:
            log.error(
                "%s %s: its audit record was not written: %s", request.method, record["route"], exc
            )
            if response.prepared:
                return response  # streamed: its status and body are sent already
            return problem(
                503,
                "Audit trail unavailable",
                "the request could not be recorded, so its answer is withheld; try again",
            )
        return response

    return access


def _record(
    request: web.Request, verdict: Verdict, response: web.StreamResponse, seconds: float
) -> dict[str, Any]:
    route = request.match_info.route.resource
    record: dict[str, Any] = {
        "client": verdict.client,
        "tenant": verdict.tenant,
        "remote": request.remote,
        "method": request.method,
        "route": route.canonical if route is not None else None,
        "status": response.status,
        "bytes": _body_size(response),
        "ms": round(seconds * 1000, 1),
    }
    for name in _UID_PARAMS:
        if name in request.match_info:
            record[name] = phi.ref(request.match_info[name])
    if request.query:
        record.update(query_keys(request.query))
    record.update(request.get("audit", {}))
    return record


def _body_size(response: web.StreamResponse) -> int:
    """The bytes of the answer's body. A Response is sent after the middlewares return,
    so its `body_length` is still 0 here; a streamed one has counted what it wrote."""
    if isinstance(response, Streamed):
        return response.sent
    if isinstance(response, web.Response):
        return response.content_length or 0
    return response.body_length


def build_app(
    *,
    flow: Flow,
    metrics: GatewayMetrics,
    health: Callable[[], dict[str, Any]],
    readiness: Callable[[], dict[str, Any]],
    liveness: Callable[[], dict[str, Any]],
    tokens: Tokens,
    audit: AuditTrail,
    dicomweb: DicomWeb,
    exporter: Exporter,
    limits: HttpLimits,
    waiters: Waiters,
    public_url: str | None = None,
) -> web.Application:
    routes = web.RouteTableDef()
    description = openapi.document()

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def shown(job: Job) -> Job:
        """A job whose study is served de-identified names it by the pseudonym its copy
        carries: whoever holds the job never learns the original UID."""
        if not job.deidentify:
            return job
        return job.model_copy(update={"study_uid": dicomweb.deid.pseudonym(job.study_uid)})

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        report = await run(health)
        return web.json_response(report, status=200 if report["ok"] else 503)

    @routes.get("/readyz")
    async def readyz(request: web.Request) -> web.Response:
        report = readiness()
        return web.json_response(report, status=200 if report["ready"] else 503)

    @routes.get("/livez")
    async def livez(request: web.Request) -> web.Response:
        report = liveness()
        return web.json_response(report, status=200 if report["live"] else 503)

    @routes.get("/metrics")
    async def scrape(request: web.Request) -> web.Response:
        body = await run(generate_latest, metrics.exposed)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/openapi.json")
    async def describe(request: web.Request) -> web.Response:
        return web.json_response(description)

    @routes.post("/exports")
    async def export(request: web.Request) -> web.Response:
        body = await _body(request, ExportRequest)
        request["audit"] = {"study": phi.ref(body.study), "destination": body.destination}
        return _json(await exporter.export(body))

    @routes.post("/jobs/claim")
    async def claim(request: web.Request) -> web.Response:
        wait = _int(request, "wait", 0, MAX_WAIT_S)
        body = await _body(request, ClaimRequest)

        async def once() -> Job | None:
            found: Job | None = await run(flow.claim, body.model, body.owner, body.lease_seconds)
            return found

        job = await waiters.claim(body.model, wait, once)
        return web.Response(status=204) if job is None else _json(shown(job))

    @routes.post("/jobs/{job:[0-9]{1,18}}/extend")
    async def extend(request: web.Request) -> web.Response:
        body = await _body(request, ExtendRequest)
        job = await run(flow.extend, _job_id(request), body.token, body.lease_seconds)
        return _json(shown(job))

    @routes.post("/jobs/{job:[0-9]{1,18}}/complete")
    async def complete(request: web.Request) -> web.Response:
        body = await _body(request, CompleteRequest)
        job = await run(
            flow.complete, _job_id(request), body.token, body.findings, base_url(request)
        )
        return _json(shown(job))

    @routes.post("/jobs/{job:[0-9]{1,18}}/fail")
    async def fail(request: web.Request) -> web.Response:
        body = await _body(request, FailRequest)
        job = await run(flow.fail, _job_id(request), body.token, body.reason, body.retryable)
        return _json(shown(job))

    @routes.get("/jobs/{job:[0-9]{1,18}}")
    async def get_job(request: web.Request) -> web.Response:
        return _json(shown(await run(flow.catalog.job, _job_id(request))))

    @routes.get("/jobs")
    async def list_jobs(request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in set(JobState):
            raise _Problem(400, "Bad request", f"state must be one of {', '.join(JobState)}")
        claimable = request.query.get("claimable", "false").lower()
        if claimable not in ("true", "false"):
            raise _Problem(400, "Bad request", "claimable must be true or false")
        jobs = await run(
            lambda: flow.catalog.jobs(
                state=state,
                model=request.query.get("model"),
                limit=_int(request, "limit", 100, openapi.MAX_PAGE),
                offset=_int(request, "offset", 0, openapi.MAX_OFFSET),
                claimable_at=time.time() if claimable == "true" else None,
            )
        )
        return _json([shown(job) for job in jobs])

    @routes.get("/worklist")
    async def worklist(request: web.Request) -> web.Response:
        limit = _int(request, "limit", 100, openapi.MAX_PAGE)
        offset = _int(request, "offset", 0, openapi.MAX_OFFSET)
        return _json(await run(flow.catalog.worklist, limit, offset))

    app = web.Application(
        middlewares=[
            _measured(metrics),
            _access(tokens, audit),
            _strict_query(description),
            _errors,
            paced(limits),
        ],
        client_max_size=1 << 20,
    )
    app.add_routes(routes)
    app.add_routes(dicomweb.routes())
    if public_url is not None:
        app[PUBLIC_URL] = public_url
    return app
