"""DICOMweb on the gateway's HTTP port: STOW-RS, QIDO-RS and WADO-RS handlers.

Thin on purpose: the protocol lives in `telerad.runtime.dicomweb` (pure), storage in
`Ingest` (the same checks and durability as C-STORE) and the catalog. File reads, parsing
and SQLite run in worker threads so one large retrieval never stalls the event loop.
Retrievals stream one instance at a time: a 300-slice study never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from pydicom import dcmread

from telerad.api.jobs import JOB_HEADER, LEASE_NOT_HELD, Job
from telerad.runtime.dataset import StoreStatus, valid_uid
from telerad.runtime.dicomweb import media, multipart, qido, stow, wado
from telerad.runtime.gateway.deid import Deidentifier
from telerad.runtime.gateway.ingest import Incoming, Ingest
from telerad.runtime.store.catalog import Catalog, LeaseLost, Located, UnknownJob
from telerad.runtime.store.envelope import EnvelopeError
from telerad.runtime.store.tier import Archived, Tier

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Problem = Callable[[int, str, str], web.Response]
DICOM_JSON = "application/dicom+json"
PUBLIC_URL = web.AppKey("public_url", str)
CHUNK = 1 << 20
SMALL_FILE = 8 << 20
"""Largest instance read whole to be sent; larger ones are streamed a chunk at a time."""
READ_AHEAD = 3
"""Instances of a retrieval read ahead of the one being sent."""
HEAD = 1 << 20
"""What of a STOW part is read into memory before its file meta is known: real ones are
a few hundred bytes."""
RESULT_LIMIT = 256 << 20
"""Largest result of a de-identified job (an SR, a SEG) that is re-identified: pydicom
reads it whole, so it is bounded; larger ones are refused (out of resources)."""
# A top-level tag, or a path through sequence items: 00880200/0/7FE00010.
BULK_PATH = r"[0-9A-Fa-f]{8}(?:/[0-9]+/[0-9A-Fa-f]{8})*"
_JOB_VALUE = re.compile(r"([0-9]{1,18}):([A-Za-z0-9_-]{16,64})")
# Ingest's refusals that are STOW-RS failure reasons as they are (PS3.18 borrows PS3.4's).
_REASONS = frozenset(
    {
        StoreStatus.OUT_OF_RESOURCES,
        StoreStatus.STUDY_MISMATCH,
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.PROCESSING_FAILURE,
    }
)


class Streamed(web.StreamResponse):
    """A streamed answer that counts its body: aiohttp's own count (`body_length`)
    includes the headers and chunk framing."""

    sent = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        try:
            await super().write(data)
        except ConnectionResetError as exc:
            raise ClientGone(self) from exc


class ClientGone(Exception):
    """The client closed the connection in the middle of a streamed answer: nothing to
    answer, and nothing failed (the HTTP layer ends the exchange with `response`)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client closed the connection mid-answer")
        self.response = response


@dataclass(frozen=True, slots=True)
class _Received:
    """A STOW part received whole: its data set on disk, and the file meta it came with."""

    incoming: Incoming
    meta: stow.Part10


def _discard(received: list[_Received | stow.Refused]) -> None:
    """Drop the files of parts received (a few system calls each, so done at once, also
    when the request is being cancelled)."""
    for part in received:
        if isinstance(part, _Received):
            part.incoming.discard()


def _malformed(request: web.Request, exc: Exception, parts: int, *, inside: bool) -> str:
    """What was wrong with a multipart body, and where."""
    if not request.content.total_bytes:
        return "the body is empty: STOW-RS takes one part per instance"
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    if isinstance(exc, LineTooLong):
        what = f"a part header line is longer than {request.protocol.max_field_size} bytes"
    elif text.startswith("Could not find starting boundary"):
        boundary = multipart.parse_related(request.headers.get("Content-Type", ""))[0]
        what = f"the boundary its Content-Type names is not in it: no line --{boundary}"
    elif "after EOF" in text or "did not read all" in text:
        what = "it ends inside a part, without the closing boundary"
    else:
        # aiohttp's words; what the client sent is quoted in them: cut short and cleaned.
        what = _printable(text)[:200]
    where = f"in part {parts + 1}" if inside else f"at the start of part {parts + 1}"
    kept = f"; the {parts} part(s) before it are not stored either" if parts else ""
    return f"the multipart/related body is malformed {where}: {what}{kept}"


class DicomWebError(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.close = close
        """Whether the connection is closed after the answer (what follows is not a request)."""
        self.headers = headers or {}
        """Headers of the answer besides the problem's own (`Retry-After`)."""


@contextlib.contextmanager
def _unopened() -> Iterator[None]:
    """A stored instance the keyring cannot open is the server's fault, said as such."""
    try:
        yield
    except EnvelopeError as exc:
        log.error("a stored instance cannot be opened: %s", exc)
        raise DicomWebError(
            500, "Internal", "a stored instance cannot be opened with the site's keys"
        ) from None


def _not_found(what: str) -> DicomWebError:
    # The same words whether the UID is malformed or absent: nothing to learn by probing.
    return DicomWebError(404, "Not found", f"no such {what}")


class DicomWeb:
    def __init__(
        self, catalog: Catalog, tiers: dict[str, Tier], ingest: Ingest, deid: Deidentifier
    ) -> None:
        self.catalog = catalog
        self.tiers = tiers
        self.ingest = ingest
        self.deid = deid

    def routes(self) -> list[web.RouteDef]:
        instance = "/studies/{study}/series/{series}/instances/{instance}"
        return [
            web.post("/studies", self.store),
            web.post("/studies/{study}", self.store),
            web.get("/studies", self._search(qido.Level.STUDY)),
            web.get("/series", self._search(qido.Level.SERIES)),
            web.get("/instances", self._search(qido.Level.INSTANCE)),
            web.get("/studies/{study}/series", self._search(qido.Level.SERIES)),
            web.get("/studies/{study}/instances", self._search(qido.Level.INSTANCE)),
            web.get(
                "/studies/{study}/series/{series}/instances", self._search(qido.Level.INSTANCE)
            ),
            web.get("/studies/{study}", self.retrieve),
            web.get("/studies/{study}/series/{series}", self.retrieve),
            web.get(instance, self.retrieve),
            web.get("/studies/{study}/metadata", self.metadata),
            web.get("/studies/{study}/series/{series}/metadata", self.metadata),
            web.get(f"{instance}/metadata", self.metadata),
            web.get(f"{instance}/frames/{{frames}}", self.frames),
            web.get(f"{instance}/bulkdata/{{tag:{BULK_PATH}}}", self.bulkdata),
        ]

    async def _job(self, request: web.Request, study: str | None) -> Job | None:
        """The leased job a request is made for (the Telerad-Job header), checked."""
        value = request.headers.get(JOB_HEADER)
        if value is None:
            return None
        not_held = DicomWebError(
            LEASE_NOT_HELD,
            "Precondition failed",
            f"{JOB_HEADER} does not name a job leased under its token (<job id>:<lease token>)",
        )
        match = _JOB_VALUE.fullmatch(value.strip())
        if match is None:
            raise not_held
        job_id, token = int(match.group(1)), match.group(2)
        try:
            job = await asyncio.to_thread(self.catalog.leased_job, job_id, token)
        except (LeaseLost, UnknownJob):
            # The same answer for an unknown job, a lost lease or a malformed value.
            raise not_held from None
        named = self.deid.pseudonym(job.study_uid) if job.deidentify else job.study_uid
        if study != named:
            raise DicomWebError(400, "Bad request", f"job {job_id} is for another study")
        request["audit"] = {"job": job_id}
        return job

    # -- STOW-RS ----------------------------------------------------------------
    async def store(self, request: web.Request) -> web.Response:
        """Every part is written to the hot tier as it arrives; the instances are checked
        and stored once the body has ended well. A malformed body stores nothing (400)."""
        study = request.match_info.get("study")
        if study is not None and not valid_uid(study):
            raise DicomWebError(400, "Bad request", "the study in the URL is not a valid UID")
        job = await self._job(request, study)
        restore: Callable[[bytes], bytes] | None = None
        if job is not None and job.deidentify:
            restore = await asyncio.to_thread(self._reidentifier, job.study_uid)
        try:
            _, part_type = multipart.parse_related(request.headers.get("Content-Type", ""))
        except ValueError as exc:
            raise DicomWebError(415, "Unsupported media type", str(exc)) from None
        if part_type not in (None, "application/dicom"):
            raise DicomWebError(
                415,
                "Unsupported media type",
                f'parts of type "{part_type}" are not supported; send "application/dicom"',
            )
        base = base_url(request)
        client = str(request.get("client") or "DICOMWEB")[:16]
        received = await self._receive(request, client, restore)
        outcomes: list[stow.Outcome] = []
        try:
            for r in received:
                outcomes.append(
                    r
                    if isinstance(r, stow.Refused)
                    else await asyncio.to_thread(self._ingest, r, study, base, job)
                )
        finally:
            # A client gone meanwhile: the part in flight finishes in its thread (which
            # leaves nothing behind either way); those after it are dropped.
            _discard(received[len(outcomes) + 1 :])
        status, body = stow.response(outcomes, f"{base}/studies/{study}" if study else None)
        request["audit"] = {
            **request.get("audit", {}),
            "stored": sum(isinstance(o, stow.Stored) for o in outcomes),
            "failed": sum(not isinstance(o, stow.Stored) for o in outcomes),
        }
        return _json(body, DICOM_JSON, status)

    async def _receive(
        self, request: web.Request, client: str, restore: Callable[[bytes], bytes] | None
    ) -> list[_Received | stow.Refused]:
        """Every part of the body, written to disk (or refused as it came); nothing of a
        malformed body stays."""
        received: list[_Received | stow.Refused] = []
        inside = False
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                inside = True
                if not isinstance(part, BodyPartReader):
                    # A nested multipart is not an instance; drain it and say so.
                    received.append(stow.refused(StoreStatus.CANNOT_UNDERSTAND, "nested multipart"))
                else:
                    received.append(await self._receive_part(part, client, restore))
                inside = False
        except (ValueError, HttpProcessingError) as exc:
            _discard(received)
            detail = _malformed(request, exc, len(received), inside=inside)
            raise DicomWebError(400, "Bad request", detail, close=True) from None
        except BaseException:
            _discard(received)
            raise
        if not received:
            raise DicomWebError(400, "Bad request", "the request has no parts")
        return received

    def _reidentifier(self, study_uid: str) -> Callable[[bytes], bytes]:
        """What turns a result made from the de-identified copy back into one of the study."""
        headers = [
            dcmread(io.BytesIO(self._read(where)), stop_before_pixels=True)
            for where in self.catalog.locate(study_uid)
        ]
        if not headers:
            raise _not_found("study")
        return self.deid.reidentifier(headers, study_uid)

    async def _receive_part(
        self, part: BodyPartReader, client: str, restore: Callable[[bytes], bytes] | None
    ) -> _Received | stow.Refused:
        """A part read to its end: its data set on disk behind the file meta it announced,
        or why it is refused. Only the file meta is held in memory (and a result to
        re-identify, which pydicom must read whole)."""
        kind = part.headers.get("Content-Type", "application/dicom").split(";")[0].strip()
        if kind.lower() != "application/dicom":
            await part.release()
            return stow.refused(StoreStatus.CANNOT_UNDERSTAND, f"part of type {kind!r}")
        limit = RESULT_LIMIT if restore is not None else HEAD
        head = bytearray()
        while len(head) < limit and (chunk := await part.read_chunk(CHUNK)):
            head += chunk
        whole = part.at_eof()
        if restore is not None:
            if not whole:
                await part.release()
                return stow.refused(
                    StoreStatus.OUT_OF_RESOURCES, f"a result over {RESULT_LIMIT} bytes"
                )
            try:
                head = bytearray(await asyncio.to_thread(restore, bytes(head)))
            except Exception as exc:
                return stow.refused(StoreStatus.CANNOT_UNDERSTAND, f"not readable: {exc}"[:64])
        try:
            meta = stow.split(head, whole=whole)
        except stow.InvalidPart as exc:
            await part.release()
            return stow.refused(StoreStatus.CANNOT_UNDERSTAND, str(exc))
        incoming = await asyncio.to_thread(
            self.ingest.begin,
            meta.transfer_syntax,
            meta.sop_class_uid,
            meta.sop_instance_uid,
            client,
        )
        try:
            await asyncio.to_thread(incoming.write, memoryview(head)[meta.offset :])
            del head
            while chunk := await part.read_chunk(CHUNK):
                await asyncio.to_thread(incoming.write, chunk)
        except BaseException:
            incoming.discard()  # at once, not in a thread: this may be a cancellation
            raise
        return _Received(incoming, meta)

    def _ingest(
        self, received: _Received, study: str | None, base: str, job: Job | None
    ) -> stow.Outcome:
        # A result of a de-identified job is stored under the original study (it was
        # re-identified), and the answer names the study as its sender knows it.
        original = job.study_uid if job is not None else study
        meta = received.meta
        outcome = self.ingest.finish(
            received.incoming,
            study_uid=original,
            result_of=job.id if job is not None else None,
        )
        header = outcome.header
        if header is None:
            return stow.refused(
                outcome.status if outcome.status in _REASONS else StoreStatus.PROCESSING_FAILURE,
                outcome.comment or "",
                meta.sop_class_uid,
                meta.sop_instance_uid,
            )
        named = study if job is not None and job.deidentify else header.study_uid
        url = (
            f"{base}/studies/{named}/series/{header.series_uid}/instances/{header.sop_instance_uid}"
        )
        warning = int(outcome.status) if outcome.status != StoreStatus.SUCCESS else None
        return stow.Stored(header.sop_class_uid, header.sop_instance_uid, url, warning)

    # -- QIDO-RS ----------------------------------------------------------------
    def _search(self, level: qido.Level) -> Handler:
        async def search(request: web.Request) -> web.Response:
            content_type = _acceptable(media.dicom_json, request)
            study = request.match_info.get("study")
            series = request.match_info.get("series")
            try:
                query = qido.parse(
                    level, list(request.query.items()), study_uid=study, series_uid=series
                )
            except qido.QueryError as exc:
                raise DicomWebError(400, "Bad request", str(exc)) from None
            result = await asyncio.to_thread(self.catalog.search, query.search)
            body = qido.results(query, result, base_url(request))
            response = _json(body, content_type)
            for text in query.warnings + qido.result_warnings(query, result):
                response.headers.add("Warning", _warning(text))
            return response

        return search

    # -- WADO-RS ----------------------------------------------------------------
    async def _locate(self, request: web.Request) -> list[Located]:
        study = request.match_info["study"]
        series = request.match_info.get("series")
        instance = request.match_info.get("instance")
        if not all(valid_uid(u) for u in (study, series, instance) if u is not None):
            raise _not_found("instance" if instance else "series" if series else "study")
        located = await asyncio.to_thread(self.catalog.locate, study, series, instance)
        if not located:
            raise _not_found("instance" if instance else "series" if series else "study")
        return located

    def _tier(self, where: Located) -> Tier:
        tier = self.tiers.get(where.tier)
        if tier is None:
            raise DicomWebError(503, "Unavailable", "the instance's storage tier is not mounted")
        return tier

    def _read(self, where: Located) -> bytes:
        with _unopened():
            return self._tier(where).read(PurePosixPath(where.path))

    async def _readable(self, located: list[Located]) -> None:
        """Fail the answer before its first byte where it could not be given whole: a
        keyring that cannot open what is stored (500), or a study in an archive class,
        whose restore this starts (202 with `Retry-After`: ask again then)."""

        def check() -> int | None:
            first = located[0]
            with _unopened():
                try:
                    self._tier(first).check(PurePosixPath(first.path))
                except Archived:
                    # Restored together, so that they come back together.
                    archived = [w for w in located if w.tier == first.tier]
                    return max(self._tier(w).restore(PurePosixPath(w.path)) for w in archived)
            return None

        wait = await asyncio.to_thread(check)
        if wait is not None:
            log.info("%d archived instance(s) asked for: restoring", len(located))
            raise DicomWebError(
                202,
                "Accepted",
                f"in the {located[0].tier} tier's archive: being restored, ask again in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        job = await self._job(request, request.match_info.get("study"))
        if job is not None and job.deidentify:
            return await self._retrieve_deidentified(request, job)
        wanted = _acceptable(media.dicom_syntaxes, request)
        located = await self._locate(request)
        # Decided for all before the first byte: a 406 cannot follow a 200.
        syntaxes = [_checked(wado.check, w.transfer_syntax, wanted) for w in located]
        await self._readable(located)
        boundary = multipart.new_boundary()
        response = Streamed(
            headers={"Content-Type": multipart.content_type(boundary, "application/dicom")}
        )
        await response.prepare(request)
        base = base_url(request)

        def body(item: tuple[Located, str]) -> bytes | None:
            """An instance's part, read (and transcoded where asked); None for a large
            one sent as stored, streamed from its tier (never whole in memory)."""
            where, syntax = item
            if syntax != where.transfer_syntax:
                return wado.render(self._read(where), where.transfer_syntax, wanted)[0]
            if where.size > SMALL_FILE:
                return None
            return self._tier(where).read(PurePosixPath(where.path))

        items = list(zip(located, syntaxes, strict=True))
        async with contextlib.aclosing(_ahead(items, body)) as bodies:
            async for (where, syntax), data in bodies:
                head = multipart.part_head(
                    boundary, f"application/dicom; transfer-syntax={syntax}", _url(base, where)
                )
                await response.write(head)
                await (self._stream(response, where) if data is None else response.write(data))
                await response.write(b"\r\n")
        await response.write(multipart.closing(boundary))
        await response.write_eof()
        request["audit"] = {"instances": len(located)}
        return response

    async def _retrieve_deidentified(self, request: web.Request, job: Job) -> web.StreamResponse:
        """The job's study as its de-identified copy: stored syntax, no Content-Location
        (the URLs would name the originals)."""
        located = await asyncio.to_thread(self.catalog.locate, job.study_uid)
        if not located:
            raise _not_found("study")
        await self._readable(located)
        boundary = multipart.new_boundary()
        response = Streamed(
            headers={"Content-Type": multipart.content_type(boundary, "application/dicom")}
        )
        await response.prepare(request)
        for where in located:
            data = await asyncio.to_thread(self._read, where)
            copy = await asyncio.to_thread(self.deid.deidentify, data, job.study_uid)
            kind = f"application/dicom; transfer-syntax={where.transfer_syntax}"
            await response.write(multipart.part_head(boundary, kind))
            await response.write(copy)
            await response.write(b"\r\n")
        await response.write(multipart.closing(boundary))
        await response.write_eof()
        request["audit"] = {**request.get("audit", {}), "instances": len(located), "deid": True}
        return response

    async def _stream(self, response: web.StreamResponse, where: Located) -> None:
        chunks = self._tier(where).chunks(PurePosixPath(where.path))
        while chunk := await asyncio.to_thread(next, chunks, b""):
            await response.write(chunk)

    async def metadata(self, request: web.Request) -> web.Response:
        content_type = _acceptable(media.dicom_json, request)
        located = await self._locate(request)
        await self._readable(located)
        base = base_url(request)

        def render() -> list[dict[str, Any]]:
            return [wado.metadata(self._read(w), _url(base, w)) for w in located]

        body = await asyncio.to_thread(render)
        request["audit"] = {"instances": len(located)}
        return _json(body, content_type)

    async def frames(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["frames"]
        numbers = [int(n) for n in raw.split(",") if n.isdigit()]
        if not numbers or len(numbers) != len(raw.split(",")) or 0 in numbers:
            raise DicomWebError(400, "Bad request", "frames must be a list like 1,2,3 (from 1)")
        (where,) = await self._locate(request)
        syntax = _checked(wado.frame_syntax, where.transfer_syntax)
        part_type = _acceptable(lambda accept: media.frames(accept, syntax), request)
        await self._readable([where])
        data = await asyncio.to_thread(self._read, where)
        parts = _checked(wado.frames, data, numbers)
        return await _parts(request, parts, part_type)

    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        _acceptable(media.octet_stream, request)
        (where,) = await self._locate(request)
        await self._readable([where])
        data = await asyncio.to_thread(self._read, where)
        value = _checked(wado.bulkdata, data, request.match_info["tag"].upper())
        return await _parts(request, [value], media.OCTET_STREAM)


async def _ahead(
    items: Sequence[T], load: Callable[[T], R], window: int = READ_AHEAD
) -> AsyncGenerator[tuple[T, R], None]:
    """Each item with what `load` made of it, in order, up to `window` loads running in
    threads ahead of the one being sent: a bucket's GET is a round trip, which the next
    instances' reads overlap. Those left when the caller stops are cancelled."""
    pending: deque[tuple[T, asyncio.Future[R]]] = deque()
    upcoming = iter(items)
    try:
        while True:
            for item in itertools.islice(upcoming, window - len(pending)):
                pending.append((item, asyncio.ensure_future(asyncio.to_thread(load, item))))
            if not pending:
                return
            item, loading = pending.popleft()
            yield item, await loading
    finally:
        for _, loading in pending:
            loading.cancel()


def _acceptable(negotiate: Callable[[str | None], Any], request: web.Request) -> Any:
    try:
        return negotiate(request.headers.get("Accept"))
    except media.NotAcceptable as exc:
        raise DicomWebError(406, "Not acceptable", str(exc)) from None


def _checked(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except media.NotAcceptable as exc:
        raise DicomWebError(406, "Not acceptable", str(exc)) from None
    except wado.NotFound as exc:
        raise DicomWebError(404, "Not found", str(exc)) from None


async def _parts(request: web.Request, parts: list[bytes], part_type: str) -> web.StreamResponse:
    """A multipart/related answer of `part_type` parts (`type; parameters`)."""
    boundary = multipart.new_boundary()
    kind = part_type.split(";", 1)[0]
    response = Streamed(headers={"Content-Type": multipart.content_type(boundary, kind)})
    await response.prepare(request)
    for part in parts:
        head = multipart.part_head(boundary, part_type)
        await response.write(head + part + b"\r\n")
    await response.write(multipart.closing(boundary))
    await response.write_eof()
    return response


def _warning(text: str) -> str:
    """A `Warning: 299` value; what a client sent may be echoed in it, so anything but
    printable ASCII is replaced and the quoted string is escaped."""
    clean = _printable(text).replace("\\", "\\\\").replace('"', '\\"')
    return f'299 telerad "{clean}"'


def _printable(text: str) -> str:
    """What a client sent, fit to echo: anything but printable ASCII replaced."""
    return re.sub(r"[^\x20-\x7e]", "?", text)


def _json(body: Any, content_type: str, status: int = 200) -> web.Response:
    # No charset parameter: JSON is UTF-8 by definition, and some clients (dicomweb-client)
    # compare the media type whole.
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": content_type}
    )


def base_url(request: web.Request) -> str:
    """Where clients reach this gateway, for the URLs in answers: the configured public
    URL, else the Host the client asked for. Some clients (dicomweb-client) send a Host
    without the port; then the port the connection came in on is the one they used."""
    public = request.app.get(PUBLIC_URL)
    if public:
        return str(public).rstrip("/")
    host = request.host
    if ":" not in host.rsplit("]", 1)[-1]:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        default = 443 if request.scheme == "https" else 80
        if sockname and sockname[1] != default:
            host = f"{host}:{sockname[1]}"
    return f"{request.scheme}://{host}"


def _url(base: str, where: Located) -> str:
    return f"{base}/studies/{where.study_uid}/series/{where.series_uid}/instances/{where.sop_uid}"
