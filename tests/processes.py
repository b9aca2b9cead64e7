"""Looking at processes from the tests (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def threads(pid: int) -> int:
    """Threads of the process (its Threads line in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no Threads line")


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def signal_inner_pytest(tmp_path: Path, holder: str, how: signal.Signals) -> str:
    """Run the test module `holder` in a pytest of its own, wait for it to write the file
    named by $HELD (whole, by a rename) starting with the PID of the server its fixture
    started, check that server runs, send that pytest `how` and wait for its end. Returns
    what the file said."""
    (tmp_path / "test_holder.py").write_text(holder)
    held = tmp_path / "held"
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    inner = subprocess.Popen(
        [*pytest, "--rootdir", tmp_path, tmp_path / "test_holder.py"],
        cwd=tmp_path,
        env={**os.environ, "HELD": str(held), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert inner.poll() is None, inner.communicate()[0].decode()
            assert time.monotonic() < deadline, "the inner pytest's fixture never started"
            time.sleep(0.05)
        text = held.read_text()
        assert alive(int(text.split()[0])), text
        inner.send_signal(how)
        inner.wait(60)
    finally:
        inner.kill()
        inner.wait()
    return text
