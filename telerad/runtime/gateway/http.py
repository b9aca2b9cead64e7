"""The gateway's HTTP port: the job API for workers, the worklist, health and metrics.

Handlers only translate: bodies are parsed into the `telerad.api.jobs` models (a bad body
is a 400 naming the field), work happens in `Flow` on a worker thread (SQLite commits
fsync), and every error is an RFC 9457 problem document.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from telerad.api.jobs import (
    ClaimRequest,
    CompleteRequest,
    ExtendRequest,
    FailRequest,
    JobState,
    Problem,
)
from telerad.runtime.gateway.flow import Flow
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.store.catalog import LeaseLost, UnknownJob

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 1000


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
    if not raw.isdigit() or int(raw) > maximum:
        raise _Problem(400, "Bad request", f"{name} must be an integer from 0 to {maximum}")
    return int(raw)


def _job_id(request: web.Request) -> int:
    raw = request.match_info["job"]
    if not raw.isdigit():
        raise _Problem(404, "Not found", f"no job {raw!r}")
    return int(raw)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Problem as exc:
        return exc.response
    except UnknownJob as exc:
        return problem(404, "Not found", f"no job {exc.args[0]}")
    except LeaseLost as exc:
        return problem(409, "Lease lost", str(exc))


def build_app(
    flow: Flow, metrics: GatewayMetrics, health: Callable[[], dict[str, Any]]
) -> web.Application:
    routes = web.RouteTableDef()

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        report = await run(health)
        return web.json_response(report, status=200 if report["ok"] else 503)

    @routes.get("/metrics")
    async def scrape(request: web.Request) -> web.Response:
        body = await run(generate_latest, metrics.exposed)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.post("/jobs/claim")
    async def claim(request: web.Request) -> web.Response:
        body = await _body(request, ClaimRequest)
        job = await run(flow.claim, body.model, body.owner, body.lease_seconds)
        return web.Response(status=204) if job is None else _json(job)

    @routes.post("/jobs/{job}/extend")
    async def extend(request: web.Request) -> web.Response:
        body = await _body(request, ExtendRequest)
        return _json(await run(flow.extend, _job_id(request), body.token, body.lease_seconds))

    @routes.post("/jobs/{job}/complete")
    async def complete(request: web.Request) -> web.Response:
        body = await _body(request, CompleteRequest)
        return _json(await run(flow.complete, _job_id(request), body.token, body.findings))

    @routes.post("/jobs/{job}/fail")
    async def fail(request: web.Request) -> web.Response:
        body = await _body(request, FailRequest)
        job = await run(flow.fail, _job_id(request), body.token, body.reason, body.retryable)
        return _json(job)

    @routes.get("/jobs/{job}")
    async def get_job(request: web.Request) -> web.Response:
        return _json(await run(flow.catalog.job, _job_id(request)))

    @routes.get("/jobs")
    async def list_jobs(request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in set(JobState):
            raise _Problem(400, "Bad request", f"state must be one of {', '.join(JobState)}")
        jobs = await run(
            lambda: flow.catalog.jobs(
                state=state,
                model=request.query.get("model"),
                limit=_int(request, "limit", 100, MAX_PAGE),
                offset=_int(request, "offset", 0, 1 << 31),
            )
        )
        return _json(jobs)

    @routes.get("/worklist")
    async def worklist(request: web.Request) -> web.Response:
        limit = _int(request, "limit", 100, MAX_PAGE)
        offset = _int(request, "offset", 0, 1 << 31)
        return _json(await run(flow.catalog.worklist, limit, offset))

    app = web.Application(middlewares=[_errors], client_max_size=1 << 20)
    app.add_routes(routes)
    return app
