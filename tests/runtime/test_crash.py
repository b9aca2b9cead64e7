"""kill -9 in the middle of a 300-slice CT: every instance storescu was told is stored is
there after the restart, byte-identical and catalogued; the rest can simply be sent again."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from telerad import synthetic

from .conftest import GatewayProcess, dataset_bytes, env_nodelay, tool

SLICES = 300
KILL_AFTER = 60


def storescu(gateway: GatewayProcess, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            tool("storescu"),
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            gateway.ae_title,
            "127.0.0.1",
            str(gateway.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_nodelay(),
    )


def acknowledged(lines: list[str]) -> list[Path]:
    """Files storescu reported as stored: a "Sending file" followed by a success response."""
    done, current = [], None
    for line in lines:
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


@pytest.mark.reliability("fault", "kill -9 of the gateway during C-STORE")
@pytest.mark.timeout(300)
def test_kill_9_mid_study_loses_no_acknowledged_instance(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=SLICES, size=512, seed=7), tmp_path / "ct"
    )
    assert len(files) == SLICES
    sender = storescu(gateway, files)
    assert sender.stdout is not None
    lines: list[str] = []
    killed = threading.Event()
    for line in sender.stdout:
        lines.append(line)
        if not killed.is_set() and len(acknowledged(lines)) >= KILL_AFTER:
            gateway.kill()
            killed.set()
    sender.wait(60)
    assert killed.is_set(), "storescu finished before the gateway could be killed"
    stored = acknowledged(lines)
    assert KILL_AFTER <= len(stored) < SLICES, "the kill must land mid-study"
    assert sender.returncode != 0, "storescu must notice the gateway died"

    gateway.start()
    db = sqlite3.connect(f"file:{gateway.hot / 'catalog.sqlite'}?mode=ro", uri=True)
    catalogued = dict(db.execute("SELECT sop_uid, path FROM instances").fetchall())
    for path in stored:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in catalogued, f"{path.name} acknowledged but not catalogued"
        kept = gateway.hot / catalogued[sop]
        assert dataset_bytes(kept)[1] == dataset_bytes(path)[1], f"{path.name} differs"
    # What was caught mid-write was never acknowledged: no temporary file survives the
    # restart, and at most the one instance in flight is on disk without a catalog entry
    # (its sender was never told it is stored; storing it again replaces it).
    on_disk = list((gateway.hot / "studies").rglob("*"))
    assert not [p for p in on_disk if p.name.endswith(".tmp")]
    assert 0 <= len([p for p in on_disk if p.suffix == ".dcm"]) - len(catalogued) <= 1

    # The sender simply sends the whole series again.
    again = storescu(gateway, files)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output[-2000:]
    total = db.execute("SELECT count(*), count(DISTINCT sop_uid) FROM instances").fetchone()
    assert total == (SLICES, SLICES)
