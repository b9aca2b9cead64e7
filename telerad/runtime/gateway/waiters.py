"""Claims that wait for a job: woken when the catalog says one of their model was queued,
by this process or another sharing the catalog, or when the gateway stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
MAX_WAIT_S = 20
"""The longest a claim may wait for a job (a worker asks again after it)."""


class Waiters:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._closed = False

    def wake(self, model: str) -> None:
        """From any thread; an empty model wakes every waiter."""
        self._loop.call_soon_threadsafe(self._wake, model)

    def _wake(self, model: str) -> None:
        for name in list(self._events) if model == "" else [model]:
            event = self._events.pop(name, None)
            if event is not None:
                event.set()

    def close(self) -> None:
        """Stopping: every waiting claim answers now."""
        self._closed = True
        self._wake("")

    async def claim(
        self, model: str, seconds: float, claim: Callable[[], Awaitable[T | None]]
    ) -> T | None:
        """`claim()` now and, while it finds nothing, again each time a job of `model` is
        queued, until `seconds` pass."""
        deadline = self._loop.time() + seconds
        self._waiting[model] = self._waiting.get(model, 0) + 1
        try:
            while True:
                # Taken before the claim: a job queued between the two still wakes it.
                event = self._events.setdefault(model, asyncio.Event())
                found = await claim()
                left = deadline - self._loop.time()
                if found is not None or left <= 0 or self._closed:
                    return found
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            self._waiting[model] -= 1
            if not self._waiting[model]:
                # Models nobody waits for keep nothing (clients name any model they like).
                del self._waiting[model]
                self._events.pop(model, None)
