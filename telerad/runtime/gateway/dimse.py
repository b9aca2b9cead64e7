"""The DICOM receiver: pynetdicom's acceptor, extended through its public hooks.

- Every accepted socket gets TCP_NODELAY, and TCP_QUICKACK before each read: senders that
  leave Nagle's algorithm on would otherwise wait for our delayed ACK on every C-STORE
  and crawl at about 22 instances/s. PDUs are read whole and bounded (`_PduSocket`).
- The TLS handshake runs in the connection's own thread, not in the accept loop, so a
  slow or plain-text peer cannot hold up other senders; a failed handshake is a refusal.
- Callers are checked at association time (EVT_REQUESTED) against the allow-list: calling
  AE title and source network, then the called AE title, each with its reject reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from telerad.api.config import GatewayConfig, TLSFiles
from telerad.runtime.gateway.ingest import Ingest, Status
from telerad.runtime.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
_REJECT_CALLING = (0x01, 0x01, 0x03)
_REJECT_CALLED = (0x01, 0x01, 0x07)
_REJECT_BUSY = (0x02, 0x03, 0x02)
_HANDSHAKE_TIMEOUT_S = 10.0


# A-ABORT PDU (PS3.8 9.3.8): source service provider, reason invalid PDU parameter value.
_ABORT_INVALID_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
# The A-ASSOCIATE-RQ comes before any maximum is negotiated; it is small in practice.
_MIN_PDU_LIMIT = 1 << 16


class _PduSocket(AssociationSocket):
    """pynetdicom's socket, with three changes on the read path:

    - a PDU longer than the maximum we announced is refused (A-ABORT, connection closed)
      instead of being read into memory, however large the peer claims it is;
    - a PDU is read with `recv_into` into one buffer, not in 4 KB pieces;
    - TCP_QUICKACK is set before each read (Linux clears it after every ACK it sends).
    """

    limit: int = _MIN_PDU_LIMIT
    on_oversize: Callable[[], None] = staticmethod(lambda: None)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None  # noqa: S101  (reads happen on a connected socket)
        if nr_bytes > self.limit:
            self.on_oversize()
            with contextlib.suppress(OSError):
                sock.sendall(_ABORT_INVALID_PDU)
            raise OSError(f"peer sent a PDU of {nr_bytes} bytes, over our maximum {self.limit}")
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                return buffer[:read]  # closed by the peer: the DUL reports the short read
            read += got
        return buffer


class _Handler(RequestHandler):
    server: _Server

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert type(sock) is AssociationSocket  # noqa: S101
        # Constructing a second socket would signal a second connection to the state
        # machine; the one pynetdicom made gets our read path instead (methods only).
        sock.__class__ = _PduSocket
        assert isinstance(sock, _PduSocket)  # noqa: S101
        sock.limit = max(self.server.ae.maximum_pdu_size, _MIN_PDU_LIMIT)
        sock.on_oversize = lambda: self.server.metrics.rejection("oversized-pdu")
        return assoc


def tls_context(files: TLSFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if files.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.ca_file is not None:
        context.load_verify_locations(cafile=files.ca_file)
        context.verify_mode = (
            ssl.CERT_REQUIRED if files.require_client_certificate else ssl.CERT_OPTIONAL
        )
    elif files.require_client_certificate:
        raise ValueError("requireClientCertificate needs a CA file to check certificates against")
    return context


class _Server(ThreadedAssociationServer):
    metrics: GatewayMetrics

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # noqa: S101  (bound before serve_forever)
        raw, address = self.socket.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            wrapped = self.ssl_context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            return wrapped, address
        return raw, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(_HANDSHAKE_TIMEOUT_S)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                self.metrics.rejection("tls-handshake")
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
            request.settimeout(None)
        super().process_request_thread(request, client_address)


class DimseServer:
    """C-ECHO and C-STORE on the site's port."""

    def __init__(self, config: GatewayConfig, ingest: Ingest, metrics: GatewayMetrics) -> None:
        self._config = config
        self._ingest = ingest
        self._metrics = metrics
        self._networks = [
            (
                caller.ae_title.strip(),
                [ipaddress.ip_network(c, strict=False) for c in caller.cidrs],
            )
            for caller in config.allowed_callers
        ]
        ae = AE(ae_title=config.ae_title)
        ae.maximum_pdu_size = config.dimse.max_pdu_length
        ae.maximum_associations = config.dimse.max_associations
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 120
        # The gateway offers only Storage and Verification, so any other abstract syntax a
        # sender proposes is a storage SOP class (retired, private or newer than pynetdicom).
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self._ae = ae
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None  # noqa: S101
        return int(self._server.server_address[1])

    def start(self) -> None:
        ssl_context = tls_context(self._config.tls) if self._config.tls else None
        server = self._ae.make_server(
            (self._config.bind_address, self._config.dicom_port),
            ssl_context=ssl_context,
            evt_handlers=[
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ESTABLISHED, self._on_outcome, ["accepted"]),
                (evt.EVT_RELEASED, self._on_outcome, ["released"]),
                (evt.EVT_ABORTED, self._on_outcome, ["aborted"]),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
            ],
            server_class=_Server,
            request_handler=_Handler,
        )
        assert isinstance(server, _Server)  # noqa: S101
        server.metrics = self._metrics
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="dimse-accept", daemon=True
        )
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let running associations finish for `grace_s`, abort the rest."""
        server = self._server
        if server is None:
            return
        # socketserver's own shutdown: pynetdicom's also aborts associations at once.
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        deadline = time.monotonic() + grace_s
        while self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._ae.active_associations:
            assoc.abort()
        self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None and self._thread is not None and self._thread.is_alive()

    def active_associations(self) -> int:
        return len(self._ae.active_associations)

    # -- handlers (run in each association's thread) ----------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None  # noqa: S101  (EVT_REQUESTED follows the A-ASSOCIATE-RQ)
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = assoc.requestor.address
        reject: tuple[int, int, int] | None = None
        if not self._caller_allowed(calling, address):
            reason, reject = "unknown-caller", _REJECT_CALLING
        elif called != self._config.ae_title.strip():
            reason, reject = "wrong-called-ae", _REJECT_CALLED
        else:
            acceptors = [a for a in self._ae.active_associations if a.is_acceptor]
            if len(acceptors) > self._config.dimse.max_associations:
                reason, reject = "too-many-associations", _REJECT_BUSY
        if reject is None:
            return
        log.warning("association from %s (%s) rejected: %s", calling, address, reason)
        self._metrics.rejection(reason)
        self._metrics.association("rejected")
        assoc.acse.send_reject(*reject)
        # As pynetdicom does after its own rejections: wait until the DUL has sent the
        # A-ASSOCIATE-RJ and the peer closed, or the socket is shut under it.
        assoc.kill()

    def _caller_allowed(self, calling: str, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(
            calling == ae and (not nets or any(ip in n for n in nets))
            for ae, nets in self._networks
        )

    def _on_outcome(self, event: evt.Event, result: str) -> None:
        self._metrics.association(result)

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        request = event.request
        assert isinstance(request, C_STORE)  # noqa: S101
        stream = request.DataSet
        data = stream.getvalue() if stream is not None else b""
        outcome = self._ingest.store(
            data,
            str(event.context.transfer_syntax),
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.assoc.requestor.ae_title).strip(),
        )
        if outcome.comment is None:
            return int(outcome.status)
        status = Dataset()
        status.Status = int(outcome.status)
        status.ErrorComment = outcome.comment
        return status
