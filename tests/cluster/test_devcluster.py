"""`make cluster` / `make cluster-down` as a user runs them: detached processes, the
kubeconfig export on the last line, an idempotent second `up`, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from telerad.devcluster import ControlPlane, ControlPlaneError
from telerad.devcluster.controlplane import COMPONENTS
from tests.cluster.conftest import k8s_bin_dir
from tests.processes import alive


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return k8s_bin_dir()


def devcluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.devcluster", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_up_status_down_leaves_nothing_behind(tmp_path: Path, bin_dir: Path) -> None:
    state = tmp_path / "cluster"
    up = devcluster("up", "--dir", str(state), "--bin-dir", str(bin_dir))
    assert up.returncode == 0, up.stderr
    last = up.stdout.strip().splitlines()[-1]
    assert last == f"export KUBECONFIG={state / 'kubeconfig'}"
    try:
        pids = dict(ControlPlane.running_processes(state))
        assert set(pids) == set(COMPONENTS)
        nodes = subprocess.run(
            [
                bin_dir / "kubectl",
                f"--kubeconfig={state / 'kubeconfig'}",
                "get",
                "nodes",
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert len(json.loads(nodes.stdout)["items"]) == 4
        assert devcluster("status", "--dir", str(state)).returncode == 0
        again = devcluster("up", "--dir", str(state), "--bin-dir", str(bin_dir))
        assert again.returncode == 0
        assert "already running" in again.stderr
        assert again.stdout.strip().splitlines()[-1] == last
        assert dict(ControlPlane.running_processes(state)) == pids
        for name in COMPONENTS:
            assert (state / "logs" / f"{name}.log").exists()
    finally:
        down = devcluster("down", "--dir", str(state))
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids.values() if alive(pid)]
    assert devcluster("status", "--dir", str(state)).returncode == 1
    assert (state / "logs" / "kube-apiserver.log").exists()


def test_failed_start_raises_with_the_component_log_and_stops_the_rest(
    tmp_path: Path, bin_dir: Path
) -> None:
    # A regular file where etcd expects its data directory: a real etcd start failure.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    plane = ControlPlane(bin_dir=bin_dir, state_dir=tmp_path / "state", etcd_data_dir=blocker)
    with pytest.raises(ControlPlaneError) as failure:
        plane.start(timeout=60)
    message = str(failure.value)
    assert message.startswith("etcd exited with code")
    assert str(blocker) in message  # the log tail names what etcd could not use
    assert plane.processes == []
