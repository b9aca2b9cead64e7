"""STOW-RS bodies that are not what they announce, sent over raw sockets to a real
gateway: each malformed one is a 400 problem document saying what was wrong and stores
nothing, and a body announced and never sent is cut off (408, connection closed) after
the configured window, with nothing stored; the gateway goes on serving throughout. The
answer reaches a client that is still sending the rest of a refused body, and a client
that goes on sending after it is cut off all the same."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from telerad.api.config import HttpLimits

from .conftest import GatewayFactory, GatewayProcess, TlsMaterial, stored, stow, temporaries

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
BOUNDARY = "telerad-test-bodies-93ad"


def part(body: bytes, boundary: str = BOUNDARY) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body + b"\r\n"


def closing(boundary: str = BOUNDARY) -> bytes:
    return f"--{boundary}--\r\n".encode()


def request_head(gateway: GatewayProcess, length: int) -> bytes:
    return (
        "POST /studies HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gateway.config.http_port}\r\n"
        f"Authorization: Bearer {gateway.token}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def connect(gateway: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.config.http_port))
    sock.settimeout(60)  # far past the gateway's own deadline: a hang fails, never blocks
    if gateway.config.tls is None:
        return sock
    context = ssl.create_default_context(cafile=gateway.verify)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def nothing_stored(gateway: GatewayProcess) -> None:
    assert stored(gateway) == []
    assert not list((gateway.hot / "studies").rglob("*.dcm"))
    assert not temporaries(gateway.hot)
    assert not list((gateway.hot / "incoming").glob("*"))


CT = CT_SMALL.read_bytes()
MALFORMED = {
    # (body, words the problem document must contain)
    "boundary mismatch": (
        part(CT, "another-boundary") + closing("another-boundary"),
        f"no line --{BOUNDARY}",
    ),
    "unterminated": (part(CT)[:-2], "in part 1: it ends inside a part, without the closing"),
    "unterminated after a good part": (
        part(CT) + part(CT)[:-2],
        "in part 2: it ends inside a part, without the closing boundary; the 1 part(s) before",
    ),
    "empty": (b"", "the body is empty"),
    "100 KB part header": (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nX-Filler: ".encode()
        + b"x" * 100_000
        + b"\r\n\r\n"
        + CT
        + b"\r\n"
        + closing(),
        "at the start of part 1: a part header line is longer than 8190 bytes",
    ),
}


@pytest.mark.reliability(
    "attack", "malformed STOW bodies (boundary mismatch, unterminated, empty, 100 KB part header)"
)
def test_malformed_stow_bodies_are_400_and_store_nothing(gateway: GatewayProcess) -> None:
    for name, (body, words) in MALFORMED.items():
        with connect(gateway) as sock:
            sock.sendall(request_head(gateway, len(body)) + body)
            status, headers, detail = answer(read_all(sock))
        assert status == 400, (name, status, detail[:300], gateway.log_tail())
        assert headers["content-type"].startswith("application/problem+json"), name
        problem = json.loads(detail)
        assert problem["status"] == 400
        assert words in problem["detail"], (name, problem)
        nothing_stored(gateway)
    assert "Traceback" not in gateway.log.read_text()
    # Still serving: the same instance in a well-formed body is stored.
    assert stow(gateway, [CT]).status_code == 200
    assert len(stored(gateway)) == 1


@pytest.mark.reliability("attack", "a STOW body announced and never sent")
def test_a_stow_body_announced_and_never_sent_is_cut_off(start_gateway: GatewayFactory) -> None:
    """Headers announcing 1 GiB, the start of a part, then silence: the gateway answers
    408 and closes the connection once a window passes without the body coming (1 s
    here), and the part it had begun is gone."""
    gateway = start_gateway(http=HttpLimits(body_timeout_seconds=1))
    with connect(gateway) as sock:
        sock.sendall(request_head(gateway, 1 << 30) + part(CT)[:4096])
        status, _, detail = answer(read_all(sock))  # returns only once it is closed
    assert status == 408, (status, detail[:300])
    assert "stopped" in json.loads(detail)["detail"]
    nothing_stored(gateway)
    assert stow(gateway, [CT]).status_code == 200


@pytest.mark.parametrize("over", ["tcp", "tls"])
def test_a_refused_body_with_megabytes_left_still_gets_its_400(
    over: str, start_gateway: GatewayFactory, tls: TlsMaterial
) -> None:
    """The gateway refuses at the 8190th byte of a part header line and 8 MB of the body
    are still coming. A client that sends all it announced before it reads (as most do)
    still reads the whole problem document and then the end of the stream: the gateway
    reads and drops the rest instead of closing on it, which would reset the connection
    and destroy the answer before the client read it. TLS cannot half-close, so there
    the end of the stream comes once the client has stopped sending."""
    gateway = start_gateway(tls=tls.server_files(mutual=False) if over == "tls" else None)
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\nX-Filler: ".encode()
        + b"x" * (8 << 20)
        + b"\r\n\r\n"
        + CT
        + b"\r\n"
        + closing()
    )
    with connect(gateway) as sock:
        # Far more than the socket buffers hold: this returns only once the gateway has
        # read most of it, and raises ConnectionResetError if it closed on the rest.
        sock.sendall(request_head(gateway, len(body)) + body)
        status, headers, detail = answer(read_all(sock))  # returns only at end of stream
    assert status == 400, (status, detail[:300], gateway.log_tail())
    assert headers["content-type"].startswith("application/problem+json")
    assert "a part header line is longer than 8190 bytes" in json.loads(detail)["detail"]
    nothing_stored(gateway)
    assert stow(gateway, [CT]).status_code == 200


def test_a_client_trickling_after_a_refusal_is_cut_off(gateway: GatewayProcess) -> None:
    """Reading and dropping the rest of a refused body has an end: a client that reads
    its 400 and then goes on sending a byte at a time is cut off all the same."""
    body, words = MALFORMED["100 KB part header"]
    with connect(gateway) as sock:
        sock.sendall(request_head(gateway, len(body)) + body)
        status, _, detail = answer(read_all(sock))
        assert status == 400 and words in json.loads(detail)["detail"]
        cut_off = False
        for _ in range(600):  # 30 s: far past the gateway's own bound
            try:
                sock.send(b"x")
            except OSError:
                cut_off = True
                break
            time.sleep(0.05)
    assert cut_off
    nothing_stored(gateway)
    assert stow(gateway, [CT]).status_code == 200
