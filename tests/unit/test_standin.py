"""A stand-in pod beside a host process on its port (`make demo` with Prometheus on 9090):
it starts when the host process listens on 127.0.0.1 only, and when one listens on every
address the demo says which port and which process, instead of failing later."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from telerad.devcluster.controlplane import ControlPlane
from telerad.devcluster.demo import Demo, DemoError
from telerad.runtime.worker.example import example_config

POD_IP = "127.244.200.9"
CONFIG = "/etc/telerad/worker.yaml"


def free_everywhere() -> int:
    """A port no address of this machine listens on (a wildcard bind checks them all)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # noqa: S104  (bound to be checked, then closed)
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_everywhere()


def hold(port: int, address: str) -> subprocess.Popen[bytes]:
    """A real host process listening on `address`:`port` (python's http.server)."""
    holder = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return holder
        except OSError:
            if time.monotonic() > deadline or holder.poll() is not None:
                holder.kill()
                pytest.fail(f"http.server did not listen on {address}:{port}")
            time.sleep(0.05)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """The demo's process handling, without a control plane (the pod is given)."""
    demo = Demo(
        bin_dir=tmp_path,
        work=tmp_path,
        plane=ControlPlane(bin_dir=tmp_path, state_dir=tmp_path / "cluster"),
    )
    yield demo
    demo.stop()


def worker_pod(root: Path, port: int) -> dict[str, Any]:
    """A worker pod whose config (as its ConfigMap would) is already under `root`."""
    root.mkdir()
    token = root / "token"
    token.write_text("default.not-a-real-token\n")
    config = example_config("http://127.0.0.1:9", "ct-head-hyperdensity", token, port)
    path = root / CONFIG.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config.to_wire()))
    return {
        "metadata": {"name": "ct-head-hyperdensity-worker-abc12"},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "args": ["worker", "--config", CONFIG],
                    "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
                }
            ]
        },
        "status": {"podIP": POD_IP},
    }


def test_a_pod_starts_beside_a_host_process_on_its_port_at_127_0_0_1(
    demo: Demo, tmp_path: Path, port: int
) -> None:
    holder = hold(port, "127.0.0.1")
    try:
        demo.run_pod("worker", worker_pod(tmp_path / "pod", port), "worker", tmp_path / "pod")
        demo.healthy("worker", f"http://{POD_IP}:{port}/healthz")
        assert holder.poll() is None  # both listen on the port, each on its own address
    finally:
        holder.kill()
        holder.wait()


def test_a_host_process_on_every_address_is_named_before_the_pod_starts(
    demo: Demo, tmp_path: Path, port: int
) -> None:
    holder = hold(port, "0.0.0.0")  # noqa: S104  (the conflict under test)
    try:
        with pytest.raises(DemoError) as refused:
            demo.run_pod("worker", worker_pod(tmp_path / "pod", port), "worker", tmp_path / "pod")
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f"port {port} of pod ct-head-hyperdensity-worker-abc12 ({POD_IP}:{port})" in message
    assert f"process {holder.pid} ({sys.executable} -m http.server {port}" in message
    assert f"listening on 0.0.0.0:{port}" in message
    assert demo.processes == []  # nothing was started
