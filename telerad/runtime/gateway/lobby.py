"""Where connections to the DICOM port wait for their A-ASSOCIATE-RQ: one thread per
receiver process, however many connections there are.

A thread per connection from its accept let peers that send nothing, or a byte now and
then, hold a thread each (3,000 connections held 3,000 threads), and under a process
limit the accept loop died of the thread it could not start. Here one selector accepts,
runs TLS handshakes and reads each request without blocking, all under one deadline from
the accept to the request's last byte. Only a whole request goes on to its guest (the
association in the making), which refuses it (the answer is sent from here) or takes the
connection to a thread of its own: threads start only for associations that may proceed,
so a process runs at most one per association slot.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

log = logging.getLogger(__name__)

POLL_S: Final = 0.5
"""Longest wait for an event: how soon a stopping receiver notices."""
LINGER_S: Final = 2.0
"""After an answer that ends the connection, how long the peer has to read it."""
ACCEPT_PAUSE_S: Final = 1.0
"""How long accepting pauses after it failed (out of file descriptors or memory): the
connections waiting in the backlog would make it fail again at once, in a busy loop."""
ACCEPTS_PER_EVENT: Final = 64
"""Connections accepted in a row before the waiting ones are served again."""
HEADER: Final = 6
T = TypeVar("T")


class Guest(Protocol):
    """The server's side of a connection in the lobby: the association in the making."""

    def header(self, kind: int, length: int) -> bytes | None:
        """The first PDU's header has come: None to read its body, or the answer (an
        A-ABORT) to send before the connection is closed."""

    def request(self, kind: int, body: bytes) -> bytes | None:
        """The first PDU is whole: None when the guest took the connection (a thread of
        its own serves it now), or the answer (an A-ASSOCIATE-RJ, an A-ABORT) to send
        before the connection is closed."""

    def left(self, why: str | None) -> None:
        """The lobby closed the connection: after the guest's answer (`why` is None) or
        for `why` (associate-timeout, tls-handshake, stopping, error)."""


class _Blocked(Exception):
    """The socket needs this event (selectors.EVENT_READ or EVENT_WRITE) to go on."""

    def __init__(self, event: int) -> None:
        self.event = event


class _Gone(Exception):
    """The peer closed the connection."""


@dataclass(eq=False)
class _Visit:
    sock: socket.socket
    address: str
    guest: Guest
    deadline: float
    handshaking: bool
    buffer: bytearray = field(default_factory=lambda: bytearray(HEADER))
    got: int = 0
    kind: int | None = None
    """The first PDU's type, once its header is in."""
    answer: bytes | None = None
    """The last words to the peer; once they are sent, the lobby waits for it to close."""
    sent: int = 0
    shut: bool = False
    events: int = 0


def _io(operation: Callable[[], T]) -> T:
    """`operation` on a non-blocking socket, or _Blocked with the event it waits for."""
    try:
        return operation()
    except (BlockingIOError, ssl.SSLWantReadError):
        raise _Blocked(selectors.EVENT_READ) from None
    except ssl.SSLWantWriteError:
        raise _Blocked(selectors.EVENT_WRITE) from None


class Lobby:
    def __init__(
        self,
        listener: socket.socket,
        arrive: Callable[[socket.socket, str], Guest],
        *,
        tls: ssl.SSLContext | None,
        deadline_s: float,
        running: Callable[[], bool],
    ) -> None:
        self._listener = listener
        self._arrive = arrive
        self._tls = tls
        self._deadline_s = deadline_s
        self._running = running
        self._selector = selectors.DefaultSelector()
        self._visits: set[_Visit] = set()
        self._deadlines: list[tuple[float, int, _Visit]] = []
        self._order = itertools.count()
        self._paused_until: float | None = None

    def run(self) -> None:
        """Serve until `running` says no, then close the connections still waiting."""
        self._selector.register(self._listener, selectors.EVENT_READ)
        try:
            while self._running():
                try:
                    self._turn()
                except Exception:
                    # The accept loop must never die: a receiver whose loop is gone keeps
                    # its share of the port and answers nothing.
                    log.exception("the DICOM accept loop failed; it goes on")
                    time.sleep(POLL_S)
        finally:
            for visit in list(self._visits):
                self._close(visit, "stopping")
            self._selector.close()

    def _turn(self) -> None:
        now = time.monotonic()
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ)
        timeout = POLL_S
        if self._deadlines:
            timeout = min(timeout, max(0.0, self._deadlines[0][0] - now))
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            else:
                self._step(key.data)
        self._expire(time.monotonic())

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # every receiver wakes for a connection; one takes it
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                log.error(
                    "accepting DICOM connections failed (%s); again in %s s", exc, ACCEPT_PAUSE_S
                )
                self._selector.unregister(self._listener)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            self._enter(sock, str(address[0]))

    def _enter(self, sock: socket.socket, address: str) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()  # reset before it got here
            return
        visit = _Visit(
            sock,
            address,
            self._arrive(sock, address),
            time.monotonic() + self._deadline_s,
            handshaking=self._tls is not None,
        )
        self._visits.add(visit)
        self._remind(visit)
        self._step(visit)

    def _remind(self, visit: _Visit) -> None:
        heapq.heappush(self._deadlines, (visit.deadline, next(self._order), visit))

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, visit = heapq.heappop(self._deadlines)
            if visit not in self._visits or visit.deadline != deadline:
                continue  # closed, handed over, or given a new deadline
            if visit.answer is not None:
                self._close(visit, None)
                continue
            log.warning(
                "connection from %s closed: no whole A-ASSOCIATE-RQ within %s s",
                visit.address,
                self._deadline_s,
            )
            self._close(visit, "associate-timeout")

    def _step(self, visit: _Visit) -> None:
        try:
            self._advance(visit)
        except _Blocked as blocked:
            self._want(visit, blocked.event)
        except (_Gone, OSError) as exc:  # ssl.SSLError is an OSError
            why = None
            if visit.handshaking:
                log.warning("TLS handshake with %s failed: %s", visit.address, exc)
                why = "tls-handshake"
            self._close(visit, why)
        except Exception:
            log.exception("connection from %s failed before its association", visit.address)
            self._close(visit, "error")

    def _advance(self, visit: _Visit) -> None:
        if visit.answer is not None:
            self._leave(visit)
            return
        sock = visit.sock
        if visit.handshaking:
            assert isinstance(sock, ssl.SSLSocket)  # noqa: S101
            _io(sock.do_handshake)
            visit.handshaking = False
        while True:
            view = memoryview(visit.buffer)[visit.got :]
            if len(view):
                count = _io(functools.partial(sock.recv_into, view, len(view)))
                if not count:
                    raise _Gone
                visit.got += count
                continue
            if visit.kind is None:
                visit.kind, _, length = struct.unpack(">BBI", visit.buffer)
                answer = visit.guest.header(visit.kind, length)
                if answer is not None:
                    self._answer(visit, answer)
                    return
                visit.buffer, visit.got = bytearray(length), 0
                continue
            # The guest may hand the socket to a thread: the selector lets go of it first.
            self._want(visit, 0)
            self._visits.discard(visit)
            answer = visit.guest.request(visit.kind, bytes(visit.buffer))
            if answer is not None:
                self._visits.add(visit)
                self._answer(visit, answer)
            return

    def _answer(self, visit: _Visit, answer: bytes) -> None:
        visit.answer = answer
        visit.deadline = time.monotonic() + LINGER_S
        self._remind(visit)
        self._step(visit)

    def _leave(self, visit: _Visit) -> None:
        """Send the answer, then wait for the peer to read it and close (or for the
        deadline): closing at once with its bytes unread would reset the connection and
        could take the answer with it."""
        assert visit.answer is not None  # noqa: S101
        answer, sock = visit.answer, visit.sock
        while visit.sent < len(answer):
            visit.sent += _io(lambda: sock.send(answer[visit.sent :]))
        if not visit.shut:
            visit.shut = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        while _io(lambda: sock.recv(4096)):
            pass
        raise _Gone

    def _want(self, visit: _Visit, events: int) -> None:
        if events == visit.events:
            return
        if not visit.events:
            self._selector.register(visit.sock, events, visit)
        elif not events:
            self._selector.unregister(visit.sock)
        else:
            self._selector.modify(visit.sock, events, visit)
        visit.events = events

    def _close(self, visit: _Visit, why: str | None) -> None:
        self._want(visit, 0)
        self._visits.discard(visit)
        with contextlib.suppress(OSError):
            visit.sock.close()
        visit.guest.left(why)
