"""Peers that hold the DICOM port without using it: slow, silent or many, and a gateway
that cannot start threads. Every wait on a peer has a deadline (`dimseTimeouts`, set small
here), connections wait for their request on one thread per receiver process, and the
accept loop outlives what fails under it. Raw sockets play the peers; dcmtk and pynetdicom
play the modality that must still get in.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from telerad.api.config import DimseTimeouts
from telerad.api.site import Dimse
from tests.processes import children, open_files, threads

from .conftest import GatewayFactory, GatewayProcess, audit_records, env_nodelay, tool
from .test_dimse import CT_SMALL, dcmtk
from .test_dimse import echo as dcmtk_echo
from .test_fuzz_dimse import associate_rq, read_pdu

# Bounds for the test to fail within, when the gateway never closes what it should.
PATIENCE_S = 30.0


def associated(gateway: GatewayProcess) -> socket.socket:
    """A raw connection whose association the gateway accepted (it holds a slot)."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=PATIENCE_S)
    sock.sendall(associate_rq(gateway.ae_title))
    kind, _ = read_pdu(sock)
    assert kind == 0x02, f"the A-ASSOCIATE-RQ was answered with {kind:#04x}"
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the gateway closed `sock` (read to its end: an A-ABORT may come first)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
    return False


def trickle(socks: list[socket.socket], data: bytes, gap_s: float) -> dict[socket.socket, int]:
    """Send `data` to each socket a byte every `gap_s` seconds until the gateway closes
    it; how many bytes each had sent by then. Fails after PATIENCE_S."""
    sent = dict.fromkeys(socks, 0)
    open_ = list(socks)
    deadline = time.monotonic() + PATIENCE_S
    while open_:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(open_)} trickling connections still open after {PATIENCE_S} s")
        for sock in list(open_):
            if closed_by_peer(sock):
                open_.remove(sock)
                continue
            if sent[sock] == len(data):
                pytest.fail(f"the gateway took all {len(data)} bytes at a byte per {gap_s} s")
            try:
                sock.send(data[sent[sock] : sent[sock] + 1])
                sent[sock] += 1
            except OSError:  # reset on a byte it did not read: closed
                open_.remove(sock)
        time.sleep(gap_s)
    return sent


def store(gateway: GatewayProcess) -> tuple[bool, str]:
    result = dcmtk(
        "storescu", "-aet", "STORESCU", "-aec", gateway.ae_title, "127.0.0.1",
        str(gateway.port), str(CT_SMALL),
    )  # fmt: skip
    return result.returncode == 0, result.stdout + result.stderr


def echoes(gateway: GatewayProcess) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = PATIENCE_S
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def gateway_pids(gateway: GatewayProcess) -> list[int]:
    """The gateway and its receiver processes."""
    assert gateway.proc is not None
    return [gateway.proc.pid, *children(gateway.proc.pid)]


@pytest.mark.reliability("attack", "slow peers: 1 byte a second on every association slot")
def test_slow_peers_on_every_slot_are_cut_and_a_modality_then_stores(
    start_gateway: GatewayFactory,
) -> None:
    """Four associations (the site's limit) each start a P-DATA PDU and send it a byte a
    second. They hold every slot (a modality is refused as busy), until their messages
    fall behind the minimum rate: then the gateway aborts them and storescu stores."""
    gateway = start_gateway(
        dimse=Dimse(max_associations=4),
        dimse_timeouts=DimseTimeouts(message_seconds=2, min_bytes_per_second=1024),
    )
    slow = [associated(gateway) for _ in range(4)]
    # Silent so far (between messages): the slots are theirs.
    stored, output = store(gateway)
    assert not stored, "storescu got in while every slot was held"
    assert "Local Limit Exceeded" in output, output
    # A P-DATA PDU announcing 16 KiB, of a data set fragment on the CT context.
    pdu = struct.pack(">BBI", 0x04, 0, 16384) + struct.pack(">IBB", 16380, 3, 0x00)
    sent = trickle(slow, pdu + bytes(16378), gap_s=1.0)
    assert all(count > 0 for count in sent.values())
    stored, output = store(gateway)
    assert stored, output
    assert gateway.metric("telerad_gateway_rejections_total", reason="too-slow") == 4
    gateway.wait_for(
        lambda: sum(r.get("result") == "too-slow" for r in audit_records(gateway)) == 4
    )
    for sock in slow:
        sock.close()


@pytest.mark.reliability("attack", "an A-ASSOCIATE-RQ trickled a byte at a time")
def test_a_trickled_association_request_is_closed_at_its_deadline(
    start_gateway: GatewayFactory,
) -> None:
    """A byte of the request every second, each long before any per-read timeout: the
    connection is closed at the request's deadline, long before the request is whole,
    and a silent connection likewise."""
    gateway = start_gateway(receivers=1, dimse_timeouts=DimseTimeouts(associate_seconds=3))
    request = associate_rq(gateway.ae_title)
    trickled = socket.create_connection(("127.0.0.1", gateway.port))
    silent = socket.create_connection(("127.0.0.1", gateway.port))
    sent = trickle([trickled], request, gap_s=1.0)[trickled]
    assert 0 < sent < len(request)
    deadline = time.monotonic() + PATIENCE_S
    while not closed_by_peer(silent):
        assert time.monotonic() < deadline, "a silent connection outlived its deadline"
        time.sleep(0.2)
    assert gateway.metric("telerad_gateway_rejections_total", reason="associate-timeout") == 2
    gateway.wait_for(
        lambda: sum(r.get("result") == "associate-timeout" for r in audit_records(gateway)) == 2
    )
    assert echoes(gateway)
    trickled.close()
    silent.close()


@pytest.mark.reliability("attack", "hundreds of idle connections (threads bounded)")
def test_idle_connections_start_no_threads(start_gateway: GatewayFactory) -> None:
    """500 connections that send nothing wait in the lobby: the gateway's processes
    hold their sockets but gain no thread each, and a modality still gets in."""
    gateway = start_gateway(receivers=2, dimse_timeouts=DimseTimeouts(associate_seconds=300))
    assert echoes(gateway)
    pids = gateway_pids(gateway)
    before_threads = sum(threads(pid) for pid in pids)
    before_files = sum(open_files(pid) for pid in pids)
    idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(500)]
    try:
        gateway.wait_for(lambda: sum(open_files(pid) for pid in pids) >= before_files + 500)
        after = sum(threads(pid) for pid in pids)
        assert after <= before_threads + 8, f"{before_threads} threads before, {after} after"
        assert echoes(gateway)
    finally:
        for sock in idle:
            sock.close()
    assert echoes(gateway)


def _pids_cgroup() -> tuple[Path, Path]:
    """A new cgroup with the pids controller, and the cgroup to move processes back to
    (ours); cgroup v1's pids hierarchy or a v2 cgroup whose parent delegates pids."""
    name = f"telerad-test-{os.getpid()}-{secrets.token_hex(3)}"
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = {controller: path for _, controller, path in (line.split(":", 2) for line in lines)}
    v1 = Path("/sys/fs/cgroup/pids")
    if "pids" in own and (v1 / "cgroup.procs").is_file():
        home = v1 / own["pids"].lstrip("/")
    else:
        home = Path("/sys/fs/cgroup") / own.get("", "/").lstrip("/")
        try:
            if "pids" not in (home / "cgroup.subtree_control").read_text().split():
                (home / "cgroup.subtree_control").write_text("+pids")
        except OSError as exc:
            pytest.fail(f"no pids cgroup controller to use here ({home}: {exc})")
    group = home / name
    group.mkdir()
    return group, home


@contextlib.contextmanager
def no_new_threads(pids: list[int]) -> Iterator[Callable[[], None]]:
    """`pids` in a cgroup whose pids.max is the tasks they have now: the kernel refuses
    them any new thread (clone fails with EAGAIN: Python's "can't start new thread")
    until the function yielded lifts the limit."""
    group, home = _pids_cgroup()

    def lift() -> None:
        (group / "pids.max").write_text("max")

    try:
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
        (group / "pids.max").write_text((group / "pids.current").read_text().strip())
        yield lift
    finally:
        lift()
        for pid in pids:
            with contextlib.suppress(OSError):  # gone already
                (home / "cgroup.procs").write_text(str(pid))
        group.rmdir()


@pytest.mark.reliability("fault", "thread creation fails under a process limit")
def test_the_accept_loop_outlives_a_thread_that_cannot_start(
    start_gateway: GatewayFactory,
) -> None:
    """The gateway in a pids cgroup at its limit (the kernel's real refusal, no fault
    injected): each association is refused as busy, none hangs and the port stays open;
    once the limit is lifted, modalities store again."""
    gateway = start_gateway(receivers=1)
    with no_new_threads(gateway_pids(gateway)) as lift:
        for _ in range(3):
            refused = dcmtk_echo(gateway)
            assert refused.returncode != 0
            assert "Local Limit Exceeded" in refused.stderr, refused.stderr + gateway.log_tail()
        lift()
        for _ in range(3):
            stored, output = store(gateway)
            assert stored, output
    assert gateway.metric("telerad_gateway_rejections_total", reason="no-thread") == 3
    log = gateway.log.read_text()
    assert log.count("no thread for the association") == 3
    assert "Exception in thread" not in log  # no thread died of it


@pytest.mark.reliability("fault", "out of file descriptors while accepting (RLIMIT_NOFILE)")
def test_the_accept_loop_outlives_running_out_of_file_descriptors(
    start_gateway: GatewayFactory,
) -> None:
    """The gateway's file limit lowered under what it holds (the kernel's EMFILE on
    accept): the connection waits in the backlog, and once the limit is back it is
    served."""
    gateway = start_gateway(receivers=1)
    assert gateway.proc is not None
    pid = gateway.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1, limits[1]))
    try:
        waiting = subprocess.Popen(
            [tool("echoscu"), "-ta", str(int(PATIENCE_S)), "-aet", "ECHOSCU", "-aec",
             gateway.ae_title, "127.0.0.1", str(gateway.port)],
            env=env_nodelay(),
        )  # fmt: skip
        gateway.wait_for(lambda: "accepting DICOM connections failed" in gateway.log.read_text())
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    assert waiting.wait(PATIENCE_S + 10) == 0
    assert echoes(gateway)
