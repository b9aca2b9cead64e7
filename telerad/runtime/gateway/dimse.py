"""The DICOM receiver: the upper layer of PS3.8 for an acceptor that does C-ECHO and
C-STORE: connections wait in the lobby (lobby.py) until their A-ASSOCIATE-RQ is whole,
then each association that may proceed gets a thread reading its blocking socket.

pynetdicom does the parts it is good at here: decoding the A-ASSOCIATE-RQ, negotiating
presentation contexts (unrestricted storage: every storage SOP class, retired and private
ones too) and encoding the A-ASSOCIATE-AC. Its acceptor loop is not used: it polls its
queues with 1 ms sleeps, reads PDUs 4 KB at a time and encodes every DIMSE response with
pydicom, which held a receiver to about a third of storescp's rate. The data path here
reads each PDU whole (bounded by the maximum we announce), collects the data set as the
sender encoded it, and answers with a few bytes built directly.

- Every accepted socket gets TCP_NODELAY, and TCP_QUICKACK before each read: senders that
  leave Nagle's algorithm on would otherwise wait for our delayed ACK on every C-STORE
  and crawl at about 22 instances/s.
- TLS handshakes run in the lobby without blocking; a failed handshake (a plain
  connection to a TLS port, an unknown client certificate) is a refusal.
- Every wait on a peer is bounded (`dimseTimeouts`): the request by one deadline from the
  accept, each message by a minimum rate after a grace, silence between messages by the
  idle time. A peer trickling bytes holds a slot for seconds, not for ever.
- Callers are checked before anything else is negotiated: calling AE title and source
  network from the allow-list, then the called AE title, then the association limit, each
  refused with its A-ASSOCIATE-RJ reason (PS3.8 9.3.4).
- Every association's audit record is written once it ended, on a thread of its own: the
  lobby, which ends those it refuses, never waits on the trail (on PostgreSQL, a database
  that may be slow or down). Its instances were answered already, so a record that cannot
  be written is logged as an error; nothing else can be done about it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from telerad.api.config import DimseTimeouts, GatewayConfig, TLSFiles
from telerad.runtime.dataset import StoreStatus
from telerad.runtime.gateway.ingest import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    Incoming,
    Ingest,
)
from telerad.runtime.gateway.lobby import Lobby
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.store.audit import AuditTrail, AuditUnavailable

log = logging.getLogger(__name__)

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING: Final = (0x01, 0x01, 0x03)
REJECT_CALLED: Final = (0x01, 0x01, 0x07)
REJECT_BUSY: Final = (0x02, 0x03, 0x02)
# A-ABORT sources and reasons, PS3.8 9.3.8.
ABORT_NOT_SPECIFIED: Final = 0x00
ABORT_UNEXPECTED_PDU: Final = 0x02
ABORT_INVALID_PARAMETER: Final = 0x06
ABORT_UNRECOGNIZED_PDU: Final = 0x01

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET: Final = 0x0101
UNRECOGNIZED_OPERATION: Final = 0x0211
# The A-ASSOCIATE-RQ comes before any maximum is agreed; real ones are a few KB.
ASSOCIATE_RQ_LIMIT: Final = 1 << 16
STOP_RECORDS_S: Final = 5.0
"""At stop, how long associations that were cut off, then their records, are waited for."""
# A command set is a few elements (a C-STORE-RQ is about 200 bytes, its longest values
# UIDs of 64 and an AE title of 16); the largest in PS3.7, an N-GET's list of attribute
# tags, stays within a few KB. A sender past 64 KiB is not sending a command: it is
# filling our memory, fragment after fragment, and is aborted.
COMMAND_SET_LIMIT: Final = 1 << 16


class PeerGone(Exception):
    """The connection closed or timed out: the association ends as aborted."""


def tls_context(files: TLSFiles, *, http: bool = False) -> ssl.SSLContext:
    """The server context; `http` never demands a client certificate, because bearer
    tokens authenticate HTTP clients and the kubelet's probes present no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if files.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file is not None:
        context.load_verify_locations(cafile=files.ca_file)
        context.verify_mode = (
            ssl.CERT_REQUIRED
            if files.require_client_certificate and not http
            else ssl.CERT_OPTIONAL
        )
    elif files.require_client_certificate:
        raise ValueError("requireClientCertificate needs a CA file to check certificates against")
    return context


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _abort(reason: int) -> bytes:
    # Source 2: the service provider (the upper layer itself found the problem).
    return _pdu(ABORT, bytes((0, 0, 2, reason)))


def _reject(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


class Slots:
    """Associations in progress in every receiver process of a gateway, held to the site's
    one limit. Each process counts its own in a shared array: connections go to whichever
    process accepts first, so a share of the limit per process refused callers while
    others had room, and a process that dies takes its count with it when it is replaced.
    """

    def __init__(self, counts: Any, index: int, limit: int) -> None:
        self._counts = counts  # a multiprocessing Array("i"), one entry per receiver
        self._index = index
        self.limit = limit

    def take(self) -> bool:
        with self._counts.get_lock():
            if sum(self._counts) >= self.limit:
                return False
            self._counts[self._index] += 1
            return True

    def give(self) -> None:
        with self._counts.get_lock():
            self._counts[self._index] -= 1


class DimseServer:
    """C-ECHO and C-STORE on the site's port."""

    def __init__(
        self,
        config: GatewayConfig,
        ingest: Ingest,
        metrics: GatewayMetrics,
        *,
        slots: Slots,
        audit: AuditTrail,
    ) -> None:
        self.config = config
        self.records = _Records(audit)
        self.slots = slots
        self.ingest = ingest
        self.metrics = metrics
        self.callers = [
            (
                caller.ae_title.strip(),
                [ipaddress.ip_network(c, strict=False) for c in caller.cidrs],
            )
            for caller in config.allowed_callers
        ]
        self.tls = tls_context(config.tls) if config.tls else None
        verification = PresentationContext()
        verification.abstract_syntax = Verification
        verification.transfer_syntax = list(ALL_TRANSFER_SYNTAXES)
        self.supported = [verification]
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def active_associations(self) -> int:
        return len(self._active)

    @staticmethod
    def listen(config: GatewayConfig) -> socket.socket:
        """The site's listening socket, shared by every receiver process: each one's
        lobby waits on it, and whichever is free first takes the next connection."""
        family = socket.AF_INET6 if ":" in config.bind_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((config.bind_address, config.dicom_port))
        listener.listen(256)
        return listener

    def start(self, listener: socket.socket) -> None:
        # Non-blocking (the flag is shared by every process holding the socket): a
        # process that loses the race for a connection goes back to waiting.
        listener.setblocking(False)
        self._listener = listener
        lobby = Lobby(
            listener,
            functools.partial(Association, self),
            tls=self.tls,
            deadline_s=self.config.dimse_timeouts.associate_seconds,
            running=lambda: self._listener is listener,
        )
        self._thread = threading.Thread(target=lobby.run, name="dimse-accept", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let running associations finish for `grace_s`, cut the rest."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._thread is not None:
            self._thread.join()
        # Closed, never shut down: other receivers still accept on the same socket.
        listener.close()
        deadline = time.monotonic() + grace_s
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            for sock in list(self._active):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        # Those cut off end at once: their records are queued before they leave `_active`.
        deadline = time.monotonic() + STOP_RECORDS_S
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
        self.records.close(STOP_RECORDS_S)

    def hand_over(self, association: Association) -> bool:
        """Start the thread of an admitted association; False when none can be started
        (a process or cgroup limit): that one is refused, the port goes on."""
        with self._lock:
            self._active.add(association.sock)
        try:
            threading.Thread(
                target=self._serve, args=(association,), name="dimse-assoc", daemon=True
            ).start()
        except RuntimeError as exc:  # "can't start new thread"
            with self._lock:
                self._active.discard(association.sock)
            log.error("no thread for the association from %s: %s", association.address, exc)
            return False
        return True

    def _serve(self, association: Association) -> None:
        sock = association.sock
        try:
            association.run()
        except PeerGone:
            pass  # the peer left or was cut off; the outcome is counted where it happened
        except Exception:
            association.outcome = "error"
            log.exception("association from %s failed", association.address)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            self.ended(association)
            with self._lock:
                self._active.discard(sock)

    def ended(self, association: Association) -> None:
        """Its slot back, its audit record on its way: once per connection, wherever it
        ended."""
        if association.slotted:
            association.slotted = False
            self.slots.give()
        self.records.put(association.record(time.monotonic() - association.started))

    def admits(self, calling: str, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(
            calling == ae and (not nets or any(ip in n for n in nets)) for ae, nets in self.callers
        )


class _Records:
    """Association records, written to the audit trail in the order they were queued."""

    def __init__(self, audit: AuditTrail) -> None:
        self._audit = audit
        self._queue: queue.SimpleQueue[dict[str, object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dimse-audit", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, object]) -> None:
        self._queue.put(record)

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            try:
                self._audit.write(record)
            except AuditUnavailable as exc:
                log.error("an association's audit record was not written: %s", exc)

    def close(self, timeout_s: float) -> None:
        """Once those queued are written (or `timeout_s` has passed)."""
        self._queue.put(None)
        self._thread.join(timeout_s)


@dataclass
class _Message:
    """A DIMSE message being received: its command, then its data set, written to the
    hot tier fragment by fragment as it comes."""

    context_id: int
    command: dict[int, bytes]
    incoming: Incoming | None = None


class _Pace:
    """The time a message may still keep the receiver waiting: `message_seconds`, plus
    what its bytes earn at `min_bytes_per_second`, less the time already spent waiting
    for them. Restarted at each message; only waits on the peer are counted."""

    def __init__(self, timeouts: DimseTimeouts) -> None:
        self.grace = timeouts.message_seconds
        self.rate = timeouts.min_bytes_per_second
        self.restart()

    def restart(self) -> None:
        self.waited = 0.0
        self.received = 0

    def left(self) -> float:
        return self.grace + self.received / self.rate - self.waited

    def spend(self, seconds: float, received: int) -> None:
        self.waited += seconds
        self.received += received


class Association:
    """One connection from its accept: its request is read and judged in the lobby, then
    an admitted association is served on a thread of its own."""

    def __init__(self, server: DimseServer, sock: socket.socket, address: str) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        self.started = time.monotonic()
        self.timeouts = server.config.dimse_timeouts
        self.pace = _Pace(self.timeouts)
        self.answer = b""
        """The A-ASSOCIATE-AC, once the request is admitted."""
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.calling = ""
        self.limit = ASSOCIATE_RQ_LIMIT
        self.command: list[bytes] = []
        self.command_size = 0
        self.message: _Message | None = None
        self.outcome = "open"
        """How it ended, for the audit log: released, aborted, rejected:<reason>, ..."""
        self.stored = 0
        self.refused = 0
        self.slotted = False
        """Whether it holds one of the gateway's association slots (given back at its end)."""

    def record(self, seconds: float) -> dict[str, object]:
        """The audit record of the association: who, from where, how it ended, how many
        instances were stored and refused. Never a UID or anything from a data set."""
        return {
            "event": "association",
            "remote": self.address,
            "calling": self.calling or None,
            "result": self.outcome,
            "stored": self.stored,
            "refused": self.refused,
            "ms": round(seconds * 1000, 1),
        }

    # -- in the lobby (lobby.Guest) ----------------------------------------------
    def header(self, kind: int, length: int) -> bytes | None:
        return self.oversized(length) if length > self.limit else None

    def request(self, kind: int, body: bytes) -> bytes | None:
        if kind != ASSOCIATE_RQ:
            self.outcome = "unexpected-pdu"
            return _abort(ABORT_UNEXPECTED_PDU)
        return self.negotiate(body)

    def left(self, why: str | None) -> None:
        if why is not None:
            self.outcome = why
            if why in ("associate-timeout", "tls-handshake"):
                self.server.metrics.rejection(why)
        self.server.ended(self)

    # -- reading ---------------------------------------------------------------
    def read_pdu(self, *, idle: bool = False) -> tuple[int, memoryview]:
        """The next PDU; `idle`: between messages, so the wait for its first byte is
        bounded by the idle time, not by the message's pace."""
        header = self._read(6, idle=idle)
        kind, _, length = struct.unpack(">BBI", header)
        if length > self.limit:
            self.send(self.oversized(length))
            raise PeerGone
        return kind, memoryview(self._read(length))

    def oversized(self, length: int) -> bytes:
        self.outcome = "oversized-pdu"
        self.server.metrics.rejection("oversized-pdu")
        log.warning(
            "PDU of %d bytes from %s, over our maximum %d", length, self.address, self.limit
        )
        return _abort(ABORT_INVALID_PARAMETER)

    def _read(self, n: int, *, idle: bool = False) -> bytearray:
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            waiting = idle and not got
            timeout = self.timeouts.idle_seconds if waiting else self.pace.left()
            if timeout <= 0:
                self.too_slow()
            self.sock.settimeout(timeout)
            began = time.monotonic()
            try:
                count = self.sock.recv_into(view[got:], n - got)
            except TimeoutError:
                if waiting:
                    raise PeerGone from None  # silent for the idle time: aborted
                self.too_slow()
            except OSError:
                raise PeerGone from None
            if not count:
                raise PeerGone
            self.pace.spend(0.0 if waiting else time.monotonic() - began, count)
            got += count
        return buffer

    def too_slow(self) -> NoReturn:
        log.warning(
            "association from %s (%s) aborted: its message came slower than %d bytes/s",
            self.calling,
            self.address,
            self.timeouts.min_bytes_per_second,
        )
        self.outcome = "too-slow"
        self.server.metrics.rejection("too-slow")
        self.send(_abort(ABORT_NOT_SPECIFIED))
        raise PeerGone

    def send(self, data: bytes) -> None:
        # A peer that reads none of our answers fills the buffers and blocks us, too.
        self.sock.settimeout(self.timeouts.message_seconds)
        try:
            self.sock.sendall(data)
        except OSError:
            raise PeerGone from None

    # -- the association -------------------------------------------------------
    def run(self) -> None:
        """Serve the admitted association on its own thread: the A-ASSOCIATE-AC, then
        its messages until it is released or aborted."""
        self.send(self.answer)
        self.limit = self.server.config.dimse.max_pdu_length
        self.server.metrics.association("accepted")
        self.outcome = "aborted"  # until released
        try:
            self.serve()
        except PeerGone:
            self.server.metrics.association("aborted")
            raise

    def negotiate(self, body: bytes) -> bytes | None:
        """Judge the request: None once admitted (holding a slot, with a thread to serve
        it), or the refusal to send."""
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(_pdu(ASSOCIATE_RQ, body))
            primitive: A_ASSOCIATE | None = request.to_primitive()
        except Exception:  # anything the decoder trips on is the peer's
            primitive = None
        # The decoder lets a request without an Application Context item through, and
        # encoding our answer to it then fails: it is as malformed as the rest.
        if primitive is None or primitive.application_context_name is None:
            return self.malformed()
        self.calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        server = self.server
        if not server.admits(self.calling, self.address):
            return self.reject("unknown-caller", REJECT_CALLING)
        if called != server.config.ae_title.strip():
            return self.reject("wrong-called-ae", REJECT_CALLED)
        return self.admit(primitive)

    def admit(self, primitive: A_ASSOCIATE) -> bytes | None:
        """A slot and a thread for a caller that passed the checks, or its refusal."""
        server = self.server
        if not server.slots.take():
            return self.reject("too-many-associations", REJECT_BUSY)
        self.slotted = True
        try:
            self.answer = self.accept(primitive)
        except Exception:
            # So does a presentation context without an abstract syntax, which
            # pynetdicom's negotiation trips on: malformed too.
            return self.malformed()
        if not server.hand_over(self):
            return self.reject("no-thread", REJECT_BUSY)
        return None

    def accept(self, request: A_ASSOCIATE) -> bytes:
        """The A-ASSOCIATE-AC for a request: every storage context it proposes, with the
        transfer syntax it prefers; the contexts accepted are kept."""
        server = self.server
        results, _ = negotiate_unrestricted(
            request.presentation_context_definition_list, server.supported
        )
        self.contexts = {
            int(cx.context_id): str(cx.transfer_syntax[0])
            for cx in results
            if cx.result == 0 and cx.context_id is not None
        }
        accept = A_ASSOCIATE()
        accept.application_context_name = request.application_context_name
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = server.config.dimse.max_pdu_length
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        accept.user_information = [max_length, implementation, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(accept)
        return bytes(pdu.encode())

    def malformed(self) -> bytes:
        self.outcome = "malformed-pdu"
        self.server.metrics.rejection("malformed-pdu")
        return _abort(ABORT_INVALID_PARAMETER)

    def reject(self, reason: str, rsd: tuple[int, int, int]) -> bytes:
        log.warning("association from %s (%s) rejected: %s", self.calling, self.address, reason)
        self.outcome = f"rejected:{reason}"
        self.server.metrics.rejection(reason)
        self.server.metrics.association("rejected")
        return _reject(*rsd)

    def serve(self) -> None:
        try:
            self._serve()
        finally:
            # An association that ends mid-data-set leaves nothing of it on disk.
            if self.message is not None and self.message.incoming is not None:
                self.message.incoming.discard()

    def _serve(self) -> None:
        while True:
            # At a message boundary the next one's pace starts afresh.
            between = not self.command and self.message is None
            if between:
                self.pace.restart()
            kind, body = self.read_pdu(idle=between)
            if kind == RELEASE_RQ:
                self.send(_pdu(RELEASE_RP, bytes(4)))
                self.server.metrics.association("released")
                self.outcome = "released"
                return
            if kind == ABORT:
                self.server.metrics.association("aborted")
                return
            if kind != P_DATA:
                self.send(_abort(ABORT_UNEXPECTED_PDU))
                raise PeerGone
            for context_id, control, fragment in self.values(body):
                self.receive(context_id, control, fragment)

    def values(self, body: memoryview) -> Iterator[tuple[int, int, bytes]]:
        """The presentation data values of a P-DATA-TF PDU (PS3.8 9.3.5.1)."""
        position = 0
        while position < len(body):
            if len(body) - position < 6:
                self.protocol_error("truncated presentation data value")
            (length,) = struct.unpack_from(">I", body, position)
            if length < 2 or length > len(body) - position - 4:
                self.protocol_error("presentation data value length out of bounds")
            context_id = body[position + 4]
            if context_id not in self.contexts:
                self.protocol_error(f"presentation context {context_id} was not accepted")
            yield context_id, body[position + 5], bytes(body[position + 6 : position + 4 + length])
            position += 4 + length

    def receive(self, context_id: int, control: int, fragment: bytes) -> None:
        last = bool(control & 0x02)
        if control & 0x01:  # a command fragment
            self.command_size += len(fragment)
            if self.command_size > COMMAND_SET_LIMIT:
                self.protocol_error(
                    f"command set over {COMMAND_SET_LIMIT} bytes", "oversized-command"
                )
            self.command.append(fragment)
            if not last:
                return
            message = _Message(context_id, _command(b"".join(self.command)))
            self.command, self.command_size = [], 0
            if _u16(message.command, 0x0800) == NO_DATA_SET:
                self.handle(message)
            else:
                message.incoming = self.server.ingest.begin(
                    self.contexts[context_id],
                    _uid(message.command, 0x0002),
                    _uid(message.command, 0x1000),
                    self.calling,
                )
                self.message = message
            return
        pending = self.message
        if pending is None or pending.incoming is None or context_id != pending.context_id:
            self.protocol_error("data set fragment without its command")
        pending.incoming.write(fragment)
        if last:
            self.message = None
            self.handle(pending)

    def protocol_error(self, what: str, reason: str = "protocol-error") -> NoReturn:
        log.warning("protocol error from %s: %s", self.address, what)
        self.outcome = reason
        self.server.metrics.rejection(reason)
        self.send(_abort(ABORT_INVALID_PARAMETER))
        raise PeerGone

    # -- DIMSE -----------------------------------------------------------------
    def handle(self, message: _Message) -> None:
        command = message.command
        field_ = _u16(command, 0x0100)
        sop_class = _uid(command, 0x0002)
        message_id = _u16(command, 0x0110)
        reply = functools.partial(self.respond, message.context_id, message_id, sop_class)
        if field_ == C_ECHO_RQ:
            reply(command_field=0x8030, status=StoreStatus.SUCCESS)
            return
        if field_ != C_STORE_RQ:
            reply(command_field=field_ | 0x8000, status=UNRECOGNIZED_OPERATION)
            return
        sop_instance = _uid(command, 0x1000)
        if message.incoming is None:
            # A C-STORE-RQ that says it has no data set: nothing to store.
            message.incoming = self.server.ingest.begin(
                self.contexts[message.context_id], sop_class, sop_instance, self.calling
            )
        outcome = self.server.ingest.finish(message.incoming)
        # Success and the warnings (0xBxxx) store the instance; anything else refuses it.
        if outcome.status == StoreStatus.SUCCESS or outcome.status >> 12 == 0xB:
            self.stored += 1
        else:
            self.refused += 1
        reply(
            command_field=0x8001,
            status=outcome.status,
            sop_instance=sop_instance,
            comment=outcome.comment,
        )

    def respond(
        self,
        context_id: int,
        message_id: int,
        sop_class: str,
        *,
        command_field: int,
        status: int,
        sop_instance: str | None = None,
        comment: str | None = None,
    ) -> None:
        elements = [
            _element(0x0002, _even(sop_class.encode(), b"\0")),
            _element(0x0100, struct.pack("<H", command_field)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
        ]
        if comment:
            elements.append(_element(0x0902, _even(error_comment(comment), b" ")))
        if sop_instance is not None:
            elements.append(_element(0x1000, _even(sop_instance.encode(), b"\0")))
        body = b"".join(elements)
        encoded = _element(0x0000, struct.pack("<I", len(body))) + body
        pdv = struct.pack(">IBB", len(encoded) + 2, context_id, 0x03) + encoded
        self.send(_pdu(P_DATA, pdv))


def error_comment(text: str) -> bytes:
    """`text` as an Error Comment (0000,0902) may hold it: one LO value, so ASCII without
    backslashes (a value separator: a quoted byte would split it in two) or control
    characters, and at most 64 characters."""
    printable = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)
    return printable[:64].rstrip().encode("ascii")


def _command(data: bytes) -> dict[int, bytes]:
    """A command set (implicit VR little endian, group 0000) as element -> value bytes."""
    out: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, position)
        position += 8
        if group != 0x0000 or length > len(data) - position:
            break
        out[element] = data[position : position + length]
        position += length
    return out


def _u16(command: dict[int, bytes], element: int) -> int:
    raw = command.get(element, b"")
    return int(struct.unpack("<H", raw[:2])[0]) if len(raw) >= 2 else 0


def _uid(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").decode("ascii", "replace").rstrip("\0 ")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value
