"""Fuzzing of the DICOM receiver (PDUs and data sets), as rows of RELIABILITY.md.

The DIMSE port is the one a hospital network reaches: anything that can open a TCP
connection to it can send any bytes. test_bad_input.py proves the gateway refuses the
broken inputs someone thought of; here hypothesis makes up the rest, against one real
gateway process per test, and the same promises must hold after every example: the
process lives, a connection ends when its peer stops sending (no hang), every instance it
acknowledged is catalogued with the bytes that were sent, and nothing else is left in the
hot tier (no stray file, no temporary).

Runs are derandomized, so CI sees the same examples every time and stays bounded.
TELERAD_FUZZ_EXAMPLES=N raises each test to at least N examples; TELERAD_FUZZ_SECONDS=S
instead repeats rounds with fresh seeds for about S seconds (a long run for recording,
`bench/reliability.py`; TELERAD_FUZZ_SEED=N replays one). Each test prints how many
examples it ran and with which seed (shown with `-rA` or `-s`).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, example, given, reject, seed, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from telerad import synthetic
from telerad.runtime.dataset import parse
from telerad.runtime.gateway.ingest import meta_length
from telerad.runtime.store.sql.catalog import SQLCatalog

from .conftest import ON_DISK, GatewayProcess, audit_records, catalog, temporaries

# raw_sending is autouse: with it pynetdicom sends each mutated data set verbatim.
from .test_bad_input import (
    CT_CLASS,
    EXPLICIT,
    dataset_bytes_of,
    part10,
    raw_sending,  # noqa: F401
)

IMPLICIT = "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"
ECHO_CONTEXT, STORE_CONTEXT = 1, 3
P_DATA, RELEASE_RQ, ABORT = 0x04, 0x05, 0x07
# What a gateway may send back: A-ASSOCIATE-AC/RJ, P-DATA-TF, A-RELEASE-RP, A-ABORT.
ANSWERS = {0x02, 0x03, 0x04, 0x06, 0x07}
# The gateway's C-STORE failures (dataset.StoreStatus); anything else is not a refusal it makes.
FAILURES = {0xA700, 0xA900, 0xC000, 0x0110}
# Twice the gateway's own request timeout (30 s): by then it has given up on a peer that
# owes it bytes, so a connection still open, or a store still unanswered, is a hang and
# not a slow disk (every store waits for two fsyncs) on a busy CI machine.
HANG_S = 60.0

_SCALE = int(os.environ.get("TELERAD_FUZZ_EXAMPLES", "0") or 0)
_SECONDS = float(os.environ.get("TELERAD_FUZZ_SECONDS", "0") or 0)


# --- running a property ----------------------------------------------------------------


def fuzz(
    name: str,
    examples: int,
    build: Callable[[], Callable[[], None]],
    counter: list[int],
    record: Callable[[str, object], None],
) -> None:
    """Run the property `build()` makes: `examples` derandomized examples, or rounds of
    them with fresh seeds until TELERAD_FUZZ_SECONDS have passed. `build` makes a new
    @given function each time because a settings or seed decorator may not be applied to
    one function twice; `counter[0]` counts the examples the property ran."""
    budget = settings(
        max_examples=max(examples, _SCALE),
        deadline=None,
        derandomize=not _SECONDS,
        database=None,  # nothing written into the checkout
        # One gateway serves every example: state carried between them is the point.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    started = time.monotonic()
    if not _SECONDS:
        budget(build())()
        seeds = "derandomized"
    else:
        first = int(os.environ.get("TELERAD_FUZZ_SEED") or secrets.randbits(32))
        rounds = 0
        # A failure names its round's seed: TELERAD_FUZZ_SEED=that replays it first.
        while rounds == 0 or time.monotonic() - started < _SECONDS:
            print(f"{name}: round {rounds}, seed {first + rounds}")
            seed(first + rounds)(budget(build()))()
            rounds += 1
        seeds = f"seeds {first}..{first + rounds - 1}"
    elapsed = time.monotonic() - started
    print(f"{name}: {counter[0]} examples ({seeds}) in {elapsed:.1f} s")
    record("fuzz_examples", counter[0])
    record("fuzz_seeds", seeds)


# --- mutations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """A number inside an encoding worth setting to extreme values: a PDU type or length,
    an item length, a command element's length or value."""

    offset: int
    size: int
    order: str = "big"


@st.composite
def field_value(draw: st.DrawFn, data: bytes, f: Field) -> bytes:
    top = (1 << (8 * f.size)) - 1
    original = int.from_bytes(data[f.offset : f.offset + f.size], f.order)  # type: ignore[arg-type]
    value = draw(
        st.one_of(
            st.sampled_from([0, 1, 2, top, top - 1, top >> 1]),
            st.integers(-16, 16).map(lambda d: (original + d) % (top + 1)),
            st.integers(0, top),
        )
    )
    return value.to_bytes(f.size, f.order)  # type: ignore[arg-type]


@st.composite
def mutated(
    draw: st.DrawFn,
    valid: bytes,
    fields: list[Field],
    boundaries: list[int],
    extra: st.SearchStrategy[bytes],
) -> bytes:
    """`valid` after a few edits: bit flips, byte values, a cut, deleted or inserted bytes,
    extreme values in `fields`, `extra` spliced in at one of `boundaries`. Edits are
    planned on `valid` and applied from the end backwards, so each lands where planned."""
    n = len(valid)
    edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "delete", "insert", "field", "splice"]))
        if kind == "flip" and n:
            at = draw(st.integers(0, n - 1))
            edits.append((at, at + 1, bytes([valid[at] ^ (1 << draw(st.integers(0, 7)))])))
        elif kind == "byte" and n:
            at = draw(st.integers(0, n - 1))
            edits.append((at, at + 1, bytes([draw(st.integers(0, 255))])))
        elif kind == "cut":
            edits.append((draw(st.integers(0, n)), n, b""))
        elif kind == "delete" and n:
            at = draw(st.integers(0, n - 1))
            edits.append((at, min(n, at + draw(st.integers(1, 64))), b""))
        elif kind == "insert":
            at = draw(st.integers(0, n))
            edits.append((at, at, draw(st.binary(min_size=1, max_size=64))))
        elif kind == "field" and fields:
            f = draw(st.sampled_from(fields))
            edits.append((f.offset, f.offset + f.size, draw(field_value(valid, f))))
        elif kind == "splice" and boundaries:
            at = draw(st.sampled_from(boundaries))
            edits.append((at, at, draw(extra)))
    out = bytearray(valid)
    # Overlapping edits are fine: later ones (in this order) act on what earlier left.
    for start, end, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        out[start:end] = replacement
    return bytes(out)


# --- PDUs --------------------------------------------------------------------------------


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_rq(called: str) -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "PYNETDICOM"
    request.called_ae_title = called
    contexts = [build_context(VERIFICATION, EXPLICIT), build_context(CT_CLASS, EXPLICIT)]
    for context, context_id in zip(contexts, (ECHO_CONTEXT, STORE_CONTEXT), strict=True):
        context.context_id = context_id
    request.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.1471.99.1"
    request.user_information = [maximum, implementation]
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(request)
    return bytes(encoded.encode())


def associate_fields(rq: bytes) -> list[Field]:
    """PDU type, length and protocol version, then every item's and sub-item's type and
    length (PS3.8 9.3.2), and the maximum length the requester announces."""
    fields = [Field(0, 1), Field(2, 4), Field(6, 2)]
    position = 74  # the fixed part: header, version, AE titles, reserved
    while position + 4 <= len(rq):
        kind, length = rq[position], int.from_bytes(rq[position + 2 : position + 4], "big")
        fields += [Field(position, 1), Field(position + 2, 2)]
        sub = {0x20: position + 8, 0x50: position + 4}.get(kind)
        end = position + 4 + length
        while sub is not None and sub + 4 <= end:
            fields += [Field(sub, 1), Field(sub + 2, 2)]
            if rq[sub] == 0x51:
                fields.append(Field(sub + 4, 4))
            sub += 4 + int.from_bytes(rq[sub + 2 : sub + 4], "big")
        position = end
    return fields


def echo_pdus() -> bytes:
    request = C_ECHO()
    request.MessageID = 1
    request.AffectedSOPClassUID = VERIFICATION
    return _encode(C_ECHO_RQ(), request, ECHO_CONTEXT)


def store_pdus(body: bytes, sop_instance: str) -> bytes:
    request = C_STORE()
    request.MessageID = 2
    request.AffectedSOPClassUID = CT_CLASS
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(body)
    return _encode(C_STORE_RQ(), request, STORE_CONTEXT)


def _encode(message: Any, primitive: Any, context_id: int) -> bytes:
    message.primitive_to_message(primitive)
    out = b""
    # Small PDUs, so a data set spans several and their boundaries can be fuzzed.
    for value in message.encode_msg(context_id, 1024):
        encoded = P_DATA_TF()
        encoded.from_primitive(value)
        out += encoded.encode()
    return out


def stream_fields(stream: bytes) -> tuple[list[Field], list[int]]:
    """The fields of a run of PDUs: each PDU's type and length, each presentation data
    value's length, context and control header, and in command fragments each element's
    length and value (implicit VR little endian); and where each PDU starts."""
    fields: list[Field] = []
    starts: list[int] = []
    position = 0
    while position + 6 <= len(stream):
        starts.append(position)
        length = int.from_bytes(stream[position + 2 : position + 6], "big")
        fields += [Field(position, 1), Field(position + 2, 4)]
        item, end = position + 6, position + 6 + length
        while stream[position] == P_DATA and item + 6 <= end:
            size = int.from_bytes(stream[item : item + 4], "big")
            fields += [Field(item, 4), Field(item + 4, 1), Field(item + 5, 1)]
            element, stop = item + 6, item + 4 + size
            while stream[item + 5] & 0x01 and element + 8 <= stop:
                value = int.from_bytes(stream[element + 4 : element + 8], "little")
                fields.append(Field(element + 4, 4, "little"))
                if value:
                    fields.append(Field(element + 8, min(value, 4), "little"))
                element += 8 + value
            item = stop
        position = end
    return fields, [*starts, len(stream)]


@dataclass(frozen=True)
class Exchange:
    """One connection's worth of bytes: sent on a fresh connection, or after a real
    association (`associated`); in pieces of `chunk` bytes when set; then either a
    half-close and a wait for the gateway to end the connection, or an abrupt close."""

    payload: bytes
    associated: bool = False
    chunk: int | None = None
    abrupt: bool = False


def any_pdu() -> st.SearchStrategy[bytes]:
    """A PDU of any type (the defined ones most often) with a random body."""
    kinds = st.one_of(st.integers(1, 7), st.integers(0, 255))
    return st.builds(pdu, kinds, st.binary(max_size=64))


def exchanges(called: str, body: bytes, sop_instance: str) -> st.SearchStrategy[Exchange]:
    rq = associate_rq(called)
    rq_fields = associate_fields(rq)
    messages = {
        "echo": echo_pdus(),
        "store": store_pdus(body, sop_instance),
        "release": pdu(RELEASE_RQ, bytes(4)),
        "abort": pdu(ABORT, bytes(4)),
    }

    @st.composite
    def after_association(draw: st.DrawFn) -> bytes:
        names = draw(st.lists(st.sampled_from(sorted(messages)), min_size=1, max_size=3))
        valid = b"".join(messages[name] for name in names)
        fields, starts = stream_fields(valid)
        return draw(mutated(valid, fields, starts, any_pdu()))

    fresh = st.one_of(
        st.binary(max_size=256),  # noise
        st.builds(lambda p, tail: p + tail, any_pdu(), st.binary(max_size=32)),
        mutated(rq, rq_fields, [0, len(rq)], any_pdu()),
    )
    return st.one_of(
        st.builds(Exchange, fresh, st.just(False), st.none() | st.integers(1, 64), st.booleans()),
        st.builds(
            Exchange,
            after_association(),
            st.just(True),
            st.none() | st.integers(1, 64),
            st.booleans(),
        ),
    )


def without_application_context(rq: bytes) -> bytes:
    """`rq` less its Application Context item, the first after the fixed part."""
    assert rq[74] == 0x10
    end = 78 + int.from_bytes(rq[76:78], "big")
    return pdu(rq[0], rq[6:74] + rq[end:])


def without_abstract_syntax(rq: bytes) -> bytes:
    """`rq` with its first presentation context's Abstract Syntax sub-item cut out."""
    item = 78 + int.from_bytes(rq[76:78], "big")  # past the Application Context item
    assert rq[item] == 0x20
    sub = item + 8  # item header, context id and reserved bytes
    assert rq[sub] == 0x30
    cut = 4 + int.from_bytes(rq[sub + 2 : sub + 4], "big")
    length = int.from_bytes(rq[item + 2 : item + 4], "big") - cut
    context = rq[item : item + 2] + length.to_bytes(2, "big") + rq[item + 4 : sub]
    return pdu(rq[0], rq[6:item] + context + rq[sub + cut :])


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read(sock, 6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _read(sock, length)


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, "the gateway closed the connection during the association"
        out += got
    return out


def drain(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes the connection; fails if it keeps it open
    for HANG_S after we stopped sending."""
    out = b""
    deadline = time.monotonic() + HANG_S
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the gateway kept a connection open {HANG_S} s after its peer stopped")
        except ConnectionResetError:
            # It closed with our bytes unread (an abort mid-PDU): the kernel resets.
            return out
        if not got:
            return out
        out += got


def acknowledged(answers: bytes) -> list[str]:
    """SOP Instance UIDs of the C-STORE responses in `answers` that report success or a
    warning; checks that every whole PDU in them is one a gateway may send."""
    stored = []
    position = 0
    while position + 6 <= len(answers):
        kind, _, length = struct.unpack_from(">BBI", answers, position)
        assert kind in ANSWERS, f"the gateway sent a PDU of type {kind:#04x}"
        body = answers[position + 6 : position + 6 + length]
        position += 6 + length
        item = 0
        while kind == P_DATA and item + 6 <= len(body):
            size = int.from_bytes(body[item : item + 4], "big")
            command = _command(body[item + 6 : item + 4 + size])
            item += 4 + size
            status = int.from_bytes(command.get(0x0900, b""), "little")
            if command.get(0x0100) == b"\x01\x80" and (status == 0 or status >> 12 == 0xB):
                stored.append(command[0x1000].rstrip(b"\0").decode())
    return stored


def _command(data: bytes) -> dict[int, bytes]:
    out = {}
    position = 0
    while position + 8 <= len(data):
        _, element, length = struct.unpack_from("<HHI", data, position)
        out[element] = data[position + 8 : position + 8 + length]
        position += 8 + length
    return out


def send(gateway: GatewayProcess, rq: bytes, exchange: Exchange) -> bytes:
    """Play `exchange` against the gateway; what it answered after the association."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=HANG_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if exchange.associated:
            sock.sendall(rq)
            kind, _ = read_pdu(sock)
            assert kind == 0x02, f"a valid A-ASSOCIATE-RQ was answered with {kind:#04x}"
        step = exchange.chunk or len(exchange.payload) or 1
        try:
            for start in range(0, len(exchange.payload), step):
                sock.sendall(exchange.payload[start : start + step])
            if exchange.abrupt:
                return b""
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            # It closed on what it had already read (a refusal, fine) and reset the
            # connection on the bytes it left unread; what it answered went with them.
            return b""
        return drain(sock)


# --- the hot tier --------------------------------------------------------------------------


@pytest.fixture
def opened(gateway: GatewayProcess) -> Iterator[SQLCatalog]:
    """The gateway's catalog, opened once for the test (a second connection): every
    example reads it, and opening a PostgreSQL catalog is a connection and a schema
    check each time."""
    with catalog(gateway) as found:
        yield found


def catalogued(opened: SQLCatalog) -> dict[tuple[str, int], tuple[str, str]]:
    """(SOP Instance UID, version) -> (path in the hot tier, transfer syntax)."""
    return {(v.sop_uid, v.version): (v.path, v.transfer_syntax) for v in opened.stored()}


def assert_hot_tier_consistent(
    gateway: GatewayProcess, opened: SQLCatalog
) -> dict[tuple[str, int], Path]:
    """Files under studies/ are exactly the catalogued ones, each parses (strictly, and as
    Part 10 with pydicom) as the instance it is catalogued as; no temporary remains."""
    rows = catalogued(opened)
    files = {p for p in (gateway.hot / "studies").rglob("*") if p.is_file()}
    paths = {key: gateway.hot / relative for key, (relative, _) in rows.items()}
    assert files == set(paths.values()), "stray or missing files in the hot tier"
    assert temporaries(gateway.hot) == []
    for (sop, version), (_, syntax) in rows.items():
        raw = gateway.read_stored(paths[sop, version])
        with warnings.catch_warnings(action="ignore"):  # about values fuzzed on purpose
            assert parse(raw[meta_length(raw) :], syntax).sop_instance_uid == sop
            stored = pydicom.dcmread(io.BytesIO(raw))
        # A mutated VR can leave the UID under another VR, whose padding pydicom keeps.
        assert str(stored.SOPInstanceUID).rstrip("\0 ") == sop
    return paths


def assert_still_serving(gateway: GatewayProcess, opened: SQLCatalog, clean: Dataset) -> None:
    """Alive, healthy, and a plain C-ECHO and a C-STORE of a valid data set still work;
    no association ended in an unhandled exception."""
    assert gateway.proc is not None
    assert gateway.proc.poll() is None, gateway.log_tail()
    assert gateway.get("/healthz")["ok"]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(clean.SOPClassUID, EXPLICIT)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assert int(assoc.send_c_store(clean).Status) == 0
    assoc.release()
    assert any(sop == clean.SOPInstanceUID for sop, _ in catalogued(opened))
    errors = [r for r in audit_records(gateway) if r.get("result") == "error"]
    assert errors == [], gateway.log_tail()
    # The receiver's own last resort (dimse.py logs it with its traceback); pynetdicom's
    # decoder logs tracebacks of its own for odd AE titles, which it then handles.
    log = gateway.log.read_text(errors="replace")
    assert " failed\nTraceback" not in log, log[log.find(" failed\nTraceback") - 200 :][:4000]


def ct_slice(number: int, sop_instance: str | None = None) -> Dataset:
    """A 16x16 CT slice: small, so most mutations land in the header, where structure is."""
    ds = next(synthetic.ct_series(n_slices=1, size=16, seed=number))
    if sop_instance is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    return ds


def encoded(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return dataset_bytes_of(buffer.getvalue())


@pytest.mark.reliability(
    "fuzz",
    "random bytes and mutated A-ASSOCIATE-RQ / P-DATA-TF PDUs on the DICOM port",
)
@ON_DISK
def test_fuzzed_pdus_never_crash_hang_or_leave_files(
    gateway: GatewayProcess,
    opened: SQLCatalog,
    record_property: Callable[[str, object], None],
) -> None:
    base = ct_slice(0)
    sent = str(base.SOPInstanceUID)
    rq = associate_rq(gateway.ae_title)
    count = [0]

    def build() -> Callable[[], None]:
        @given(exchanges(gateway.ae_title, encoded(base, EXPLICIT), str(base.SOPInstanceUID)))
        # Such a request got past the decoder, and encoding the A-ASSOCIATE-AC for it
        # raised: the connection closed with no answer, as an unhandled error.
        @example(Exchange(without_application_context(rq)))
        # A presentation context without an abstract syntax made pynetdicom's negotiation
        # raise: again no answer, an unhandled error (found by a 4-minute run).
        @example(Exchange(without_abstract_syntax(rq)))
        def exchange_leaves_the_gateway_whole(exchange: Exchange) -> None:
            count[0] += 1
            stored = acknowledged(send(gateway, rq, exchange))
            assert gateway.proc is not None
            assert gateway.proc.poll() is None, gateway.log_tail()
            keys = {s for s, _ in catalogued(opened)}
            for sop in stored:
                # The response names the request's UID; a mutated one may differ from the
                # data set's, and the data set decides what is stored (ingest.py).
                assert keys & {sop, sent}, f"{sop} acknowledged, not catalogued"

        return exchange_leaves_the_gateway_whole

    fuzz("PDUs", 1000, build, count, record_property)

    assert_still_serving(gateway, opened, ct_slice(1))
    assert_hot_tier_consistent(gateway, opened)


# --- data sets -------------------------------------------------------------------------

# Every VR, and a few that are not: the gateway must decide on the header layout from it.
VRS = [
    *b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC".split(),
    *b"UI UL UN UR US UT UV XX".split(),
    b"\0\0",
    b"ob",
]


# Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass(frozen=True)
class Element:
    """Where a top-level element of a valid encoding sits."""

    start: int
    vr: int | None  # offset of its VR; None in implicit VR
    length: Field
    end: int


def elements(body: bytes, implicit: bool) -> list[Element]:
    """The top-level elements of a valid little endian data set without sequences."""
    out = []
    position = 0
    while position < len(body):
        vr = body[position + 4 : position + 6]
        if implicit:
            length, value = Field(position + 4, 4, "little"), position + 8
        elif vr in LONG_VRS:
            length, value = Field(position + 8, 4, "little"), position + 12
        else:
            length, value = Field(position + 6, 2, "little"), position + 8
        size = int.from_bytes(body[length.offset : value], "little")
        out.append(Element(position, None if implicit else position + 4, length, value + size))
        position = value + size
    return out


def element(tag: int, vr: bytes, value: bytes, *, implicit: bool, length: int | None) -> bytes:
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", n & 0xFFFFFFFF) + value
    if vr in LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", n & 0xFFFFFFFF) + value
    return head + vr + struct.pack("<H", n & 0xFFFF) + value


@st.composite
def random_element(draw: st.DrawFn, implicit: bool, near: int) -> bytes:
    """An element with a tag near `near` (so it may well be in order) or anywhere, any VR,
    random value, and now and then a length that lies; or a sequence of undefined length
    holding items of random bytes, delimited or not."""
    tag = draw(st.integers(max(0, near - 4), near + 4) | st.integers(0, 0xFFFFFFFF))
    lie = st.none() | st.sampled_from([0, 0xFFFF, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)
    if draw(st.booleans()):
        return element(
            tag,
            draw(st.sampled_from(VRS)),
            draw(st.binary(max_size=32)),
            implicit=implicit,
            length=draw(lie),
        )
    items = b""
    for _ in range(draw(st.integers(0, 3))):
        inner = draw(st.binary(max_size=24))
        closed = draw(st.booleans())
        items += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF if closed else len(inner))
        items += inner + (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) if closed else b"")
    if draw(st.booleans()):
        items += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return element(tag, b"SQ", items, implicit=implicit, length=0xFFFFFFFF)


@dataclass(frozen=True)
class Mutant:
    syntax: str
    body: bytes


TEMPLATE_UID = "2.25." + "1" * 38  # replaced per example by a unique one of this length


def mutants(templates: dict[str, bytes]) -> st.SearchStrategy[Mutant]:
    @st.composite
    def mutant(draw: st.DrawFn) -> Mutant:
        syntax = draw(st.sampled_from(sorted(templates)))
        valid = templates[syntax]
        implicit = syntax == IMPLICIT
        table = elements(valid, implicit)
        out = bytearray(valid)
        edits: list[tuple[int, int, bytes]] = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["insert", "vr", "length", "value", "drop", "twice"]))
            target = draw(st.sampled_from(table))
            start, end = target.start, target.end
            if kind == "insert":
                near = int.from_bytes(valid[start : start + 2], "little") << 16
                near |= int.from_bytes(valid[start + 2 : start + 4], "little")
                edits.append((start, start, draw(random_element(implicit, near))))
            elif kind == "vr" and target.vr is not None:
                edits.append((target.vr, target.vr + 2, draw(st.sampled_from(VRS))))
            elif kind == "length":
                f = target.length
                edits.append((f.offset, f.offset + f.size, draw(field_value(valid, f))))
            elif kind == "value":
                # Same length, other bytes: a Specific Character Set or a UID gone wrong.
                value = target.length.offset + target.length.size
                size = end - value
                edits.append((value, end, draw(st.binary(min_size=size, max_size=size))))
            elif kind == "drop":
                edits.append((start, end, b""))
            elif kind == "twice":
                edits.append((end, end, valid[start:end]))
        for start, end, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
            out[start:end] = replacement
        # Then byte-level noise over the whole: flips, cuts, inserted bytes.
        noise = mutated(bytes(out), [], [], st.nothing())
        return Mutant(syntax, draw(noise) if draw(st.booleans()) else bytes(out))

    return mutant()


def _charset_with_nul(templates: dict[str, bytes]) -> Mutant:
    body = templates[EXPLICIT]
    return Mutant(EXPLICIT, body.replace(b"ISO_IR 100", b"ISO_IR \x0000", 1))


def _charset_as_number(templates: dict[str, bytes]) -> Mutant:
    body = templates[EXPLICIT]
    return Mutant(EXPLICIT, body.replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00US", 1))


def unique_uid(n: int) -> str:
    """A UID of TEMPLATE_UID's length unlike any other example's in every digit, so that
    a mutated digit never turns one example's instance into another's."""
    digest = int.from_bytes(hashlib.sha256(f"fuzz-{n}".encode()).digest(), "big")
    return f"2.25.{10**37 + digest % (9 * 10**37)}"


@pytest.mark.reliability(
    "fuzz",
    "mutated data sets over C-STORE (flipped and cut bytes, wrong VRs and lengths, "
    "inserted elements and sequences)",
)
@ON_DISK
def test_fuzzed_data_sets_are_stored_whole_or_refused(
    gateway: GatewayProcess,
    opened: SQLCatalog,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    base = ct_slice(0, TEMPLATE_UID)
    templates = {syntax: encoded(base, syntax) for syntax in (EXPLICIT, IMPLICIT)}
    ae = AE(ae_title="PYNETDICOM")
    ae.dimse_timeout = HANG_S  # a store left unanswered this long is a hang
    for syntax in templates:
        ae.add_requested_context(CT_CLASS, syntax)
    state: dict[str, Association] = {}
    count = [0]
    outcomes = {"stored": 0, "again": 0, "refused": 0}

    def association() -> Association:
        assoc = state.get("assoc")
        if assoc is None or not assoc.is_established:
            assoc = state["assoc"] = ae.associate(
                "127.0.0.1", gateway.port, ae_title=gateway.ae_title
            )
            assert assoc.is_established, gateway.log_tail()
        return assoc

    def build() -> Callable[[], None]:
        @given(mutants(templates))
        # A NUL inside Specific Character Set made pydicom's codec lookup raise a plain
        # ValueError: the association was dropped without a status.
        @example(_charset_with_nul(templates))
        # Specific Character Set as US was stored, and pydicom's reader raises on the file.
        @example(_charset_as_number(templates))
        def store_is_whole_or_refused(mutant: Mutant) -> None:
            count[0] += 1
            sop = unique_uid(count[0])
            body = mutant.body.replace(TEMPLATE_UID.encode(), sop.encode())
            path = part10(tmp_path, "mutant.dcm", body, sop=sop, ts=mutant.syntax)
            # pynetdicom finds where the file meta ends by reading on: a body that starts
            # with elements it takes for file meta (an insertion), it cannot frame and
            # sends nothing. Such a mutant says nothing about the gateway.
            try:
                meta, _ = split_dataset(path)
            except (OSError, ValueError, struct.error):
                reject()
            if "MediaStorageSOPInstanceUID" not in meta or "TransferSyntaxUID" not in meta:
                reject()
            before = catalogued(opened)
            answer = association().send_c_store(path)
            assert "Status" in answer, f"no C-STORE response:\n{gateway.log_tail()}"
            status = int(answer.Status)
            new = {key: row for key, row in catalogued(opened).items() if key not in before}
            if (status == 0 or status >> 12 == 0xB) and not new:
                # A mutation hit the UID, so the data set names an instance stored before
                # with these very bytes: acknowledged again, kept once (found by a
                # 4-minute run).
                uid = parse(body, mutant.syntax).sop_instance_uid
                kept_before = [
                    gateway.read_stored(relative)
                    for (sop_uid, _), (relative, _) in before.items()
                    if sop_uid == uid
                ]
                assert any(k[meta_length(k) :] == body for k in kept_before), (
                    f"stored with {status:#06x}, not catalogued"
                )
                outcomes["again"] += 1
            elif status == 0 or status >> 12 == 0xB:
                outcomes["stored"] += 1
                assert len(new) == 1, f"stored with {status:#06x}, catalogued {len(new)} times"
                ((relative, syntax),) = new.values()
                kept = gateway.read_stored(relative)
                assert kept[meta_length(kept) :] == body, "stored bytes differ from those sent"
                assert syntax == mutant.syntax
            else:
                outcomes["refused"] += 1
                assert status in FAILURES, f"unexpected status {status:#06x}"
                assert new == {}, "a refused data set was catalogued"
            assert gateway.proc is not None
            assert gateway.proc.poll() is None, gateway.log_tail()

        return store_is_whole_or_refused

    try:
        fuzz("data sets", 800, build, count, record_property)
    finally:
        if "assoc" in state and state["assoc"].is_established:
            state["assoc"].release()
    print(f"data sets: {outcomes}")

    # Both sides of the property were exercised, or it proved little.
    assert outcomes["stored"] > 0 and outcomes["refused"] > 0, outcomes
    assert len(catalogued(opened)) == outcomes["stored"]
    assert gateway.metric("telerad_gateway_rejections_total") == outcomes["refused"]
    assert_still_serving(gateway, opened, ct_slice(1))
    assert len(assert_hot_tier_consistent(gateway, opened)) == outcomes["stored"] + 1
