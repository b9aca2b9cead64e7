"""Several receiver processes behind one port: all of them take associations, one that
dies is replaced, and none outlives a gateway killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydicom.data import get_testdata_file

from tests.processes import alive

from .conftest import GatewayFactory, send_datasets
from .test_jobs import study


def children(pid: int) -> list[int]:
    """Receiver processes of a gateway (multiprocessing's resource tracker is not one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    """User and system CPU of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_receivers_share_the_port_and_are_replaced(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(receivers=3)
    assert gateway.proc is not None
    gateway.wait_for(lambda: len(children(gateway.proc.pid)) == 2)  # type: ignore[union-attr]
    # Enough associations that the kernel hands some to every receiver; counts add up
    # across processes.
    for _ in range(12):
        assert send_datasets(gateway, study(2, modality="CT", body_part="HEAD")) == [0, 0]
    assert gateway.metric("telerad_gateway_instances_received_total") == 24
    assert gateway.metric("telerad_gateway_associations_total", result="accepted") == 12
    # Receivers that lose the race for a connection get EAGAIN and keep accepting...
    assert "accepting DICOM connections failed" not in gateway.log.read_text()
    # ...by waiting for the next one, not by spinning: idle, they use (almost) no CPU.
    for child in children(gateway.proc.pid):  # type: ignore[union-attr]
        before = cpu_ticks(child)
        time.sleep(1)
        assert cpu_ticks(child) - before < os.sysconf("SC_CLK_TCK") // 4, "a receiver spins"

    victim = children(gateway.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    gateway.wait_for(
        lambda: (
            victim not in children(gateway.proc.pid)  # type: ignore[union-attr]
            and len(children(gateway.proc.pid)) == 2
        )  # type: ignore[union-attr]
    )
    assert gateway.get("/healthz")["ok"]
    assert send_datasets(gateway, study(1, modality="CT", body_part="HEAD")) == [0]


def test_no_receiver_outlives_a_killed_gateway(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(receivers=2)
    assert gateway.proc is not None
    pid = gateway.proc.pid
    gateway.wait_for(lambda: len(children(pid)) == 1)
    (child,) = children(pid)
    gateway.kill()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "a receiver survived its gateway and still holds the port"
    gateway.start()
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    assert ct.exists()
    assert send_datasets(gateway, study(1, modality="CT", body_part="HEAD")) == [0]
