"""Request bodies on the HTTP port must keep coming: aiohttp waits for an announced body
for ever, so a client that sends the headers of a 1 GB STOW-RS and then nothing would hold
its connection, and the files its parts began, as long as it liked.

Each request with a body is watched: every window of `bodyTimeoutSeconds` must bring at
least `minBodyBytesPerSecond` times as many bytes, until the body has ended. A body that
falls behind fails the read its handler is waiting in (`BodyTimeout`), which the error
middleware answers with 408 and a closed connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader, web
from aiohttp.typedefs import Middleware

from telerad.api.config import HttpLimits

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyTimeout(Exception):
    """The request body stopped coming (or came too slowly)."""


def paced(limits: HttpLimits) -> Middleware:
    @web.middleware
    async def watched(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        watch = asyncio.create_task(_watch(request.content, limits))
        try:
            return await handler(request)
        finally:
            watch.cancel()

    return watched


async def _watch(body: StreamReader, limits: HttpLimits) -> None:
    window = limits.body_timeout_seconds
    least = limits.min_body_bytes_per_second * window
    seen = body.total_bytes
    while True:
        await asyncio.sleep(window)
        if body.is_eof():
            return
        # Bytes that arrived, not bytes the handler took: a handler slow to write them
        # pauses the socket, and that is no fault of the client (a stall that long is
        # cut short all the same).
        if body.total_bytes - seen < least:
            body.set_exception(
                BodyTimeout(
                    f"the request body stopped: {body.total_bytes - seen} bytes in the last"
                    f" {window:g} s, fewer than the {least:g} required"
                )
            )
            return
        seen = body.total_bytes
