"""What peers put into the gateway's log: text, never lines of their own."""

from __future__ import annotations

import re
import socket

import pytest

from .conftest import GatewayFactory
from .test_fuzz_dimse import associate_rq, read_pdu

# A calling AE title (16 bytes) that starts a forged record and clears the terminal.
INJECTED = b"X\nFAKE ERROR\x1b[2J"


@pytest.mark.reliability("attack", "log injection through a calling AE title")
def test_a_calling_ae_title_cannot_forge_log_lines(start_gateway: GatewayFactory) -> None:
    """pynetdicom logs the invalid title at ERROR as it decodes the request, before any
    check of ours: in every receiver process the record stays one line, with the title's
    control characters escaped."""
    gateway = start_gateway(receivers=2)
    request = bytearray(associate_rq(gateway.ae_title))
    request[26:42] = INJECTED  # the Calling AE Title field of the A-ASSOCIATE-RQ
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            sock.sendall(request)
            kind, _ = read_pdu(sock)
            assert kind == 0x07  # A-ABORT: malformed
    escaped = "X\\nFAKE ERROR\\x1b[2J"
    gateway.wait_for(lambda: gateway.log.read_text().count(escaped) == 4)
    text = gateway.log.read_text()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith("FAKE ERROR")]
    # Every line is the start of a record.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines)
