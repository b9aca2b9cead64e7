"""An HTTP proxy in front of the test S3 server, for what the server itself cannot show.

versitygw accepts and ignores storage classes (it answers STANDARD for every object), so
whether a client asked for a class is seen on the requests: the proxy records each one's
method, path and headers. It can also lose the answer to a request the server has already
handled (the connection closes before the client reads a byte), the cut between a 200 and
the client that a retrying client turns into a second attempt.

Requests are forwarded as they came (the Host header included, so signatures hold) with a
Content-Length body; the answer is read whole, then sent on.

A stand-in, named as such: versitygw has no archive classes, so `archive()` makes the
proxy play S3's part for objects PUT in `GLACIER` or `DEEP_ARCHIVE`: their GETs are refused
(403 `InvalidObjectState`) until a RestoreObject (`POST ?restore`) has run its course. The
restore request still goes to the server first, so that its signature is checked there.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

# Hop-by-hop: each leg of the connection has its own.
HOP = {"connection", "keep-alive", "transfer-encoding"}
ARCHIVE_CLASSES = {"GLACIER", "DEEP_ARCHIVE"}


def _s3_error(code: str, message: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


def _restore(query: str) -> bool:
    return "restore" in parse_qs(query, keep_blank_values=True)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # as sent: "/BUCKET/KEY?QUERY"
    headers: dict[str, str]  # names in lower case


class S3Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[Seen] = []
        self._lose: list[str] = []  # methods whose next answer is lost
        self._restore_seconds: float | None = None  # archive classes played when set
        self._archived: dict[str, float | None] = {}  # path -> when its restore is done
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def lose_next_answer(self, method: str) -> None:
        """The next `method` request reaches the server; its answer never reaches the client."""
        with self._lock:
            self._lose.append(method)

    def archive(self, restore_seconds: float) -> None:
        """Play S3's archive classes from now on: a restore takes `restore_seconds`."""
        with self._lock:
            self._restore_seconds = restore_seconds

    def _stand_in(self, method: str, path: str, storage_class: str) -> tuple[int, bytes] | None:
        """The archive's answer to a request, or None where the server's own is the one."""
        key, _, query = path.partition("?")
        with self._lock:
            if self._restore_seconds is None:
                return None
            if method == "PUT":
                if storage_class in ARCHIVE_CLASSES:
                    self._archived[key] = None
                else:
                    self._archived.pop(key, None)
                return None
            restoring = method == "POST" and _restore(query)
            done = self._archived.get(key, 0.0)
            waiting = key in self._archived and (done is None or done > time.monotonic())
            answer = None
            if restoring and key not in self._archived:
                answer = 403, _s3_error("InvalidObjectState", "the object is not archived")
            elif restoring and done is None:
                self._archived[key] = time.monotonic() + self._restore_seconds
                answer = 202, b""
            elif restoring:
                answer = (
                    (409, _s3_error("RestoreAlreadyInProgress", "a restore is running"))
                    if waiting
                    else (200, b"")
                )
            elif method == "GET" and waiting:
                answer = 403, _s3_error("InvalidObjectState", "the object is archived")
            return answer

    def sent(self, method: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.method == method]

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(10)

    def _seen(self, request: Seen) -> bool:
        """Record `request`; whether its answer is to be lost."""
        with self._lock:
            self.requests.append(request)
            if request.method in self._lose:
                self._lose.remove(request.method)
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's pool expects

            def forward(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    self.send_error(501, "the test proxy takes Content-Length bodies only")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                lose = proxy._seen(Seen(self.command, self.path, headers))
                restoring = self.command == "POST" and _restore(self.path.partition("?")[2])
                stand_in = (
                    None
                    if restoring
                    else proxy._stand_in(
                        self.command, self.path, headers.get("x-amz-storage-class", "")
                    )
                )
                if stand_in is not None:
                    self.answer(*stand_in)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    upstream.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in self.headers.items():
                        if name.lower() not in HOP:
                            upstream.putheader(name, value)
                    upstream.endheaders(body)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                if lose:
                    self.close_connection = True
                    return
                if restoring and answer.status in (200, 202, 501):
                    # Signed well (the server checked): the archive answers.
                    stand_in = proxy._stand_in(self.command, self.path, "")
                    if stand_in is not None:
                        self.answer(*stand_in)
                        return
                self.send_response_only(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP | {"content-length"}:
                        self.send_header(name, value)
                # A HEAD's length is the object's, not that of the (empty) body.
                length = answer.getheader("Content-Length", "0")
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" else str(len(data))
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def answer(self, status: int, body: bytes) -> None:
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = forward

            def log_message(self, format: str, *args: object) -> None:
                pass  # the server's own log has every request

        return Forward
