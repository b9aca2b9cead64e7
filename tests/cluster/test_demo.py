"""`make demo` stays working: the README's "run it" command, end to end, in the suite; and
what the whole system says about itself carries no patient data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.cluster.conftest import k8s_bin_dir


def phi_of(studies: Path) -> set[str]:
    """Names, IDs, accession numbers and birth dates of the studies the demo sent."""
    found = set()
    for path in studies.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.PatientName)
        found |= {name, *name.split("^"), str(ds.PatientID), str(ds.AccessionNumber)}
        found.add(str(ds.PatientBirthDate))
    return {value for value in found if len(value) >= 4}


def holding(root: Path, values: set[str]) -> dict[str, set[str]]:
    """Files under `root` that contain any of `values`, with the values they contain."""
    hits: dict[str, set[str]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            found = {v for v in values if v in text}
            if found:
                hits[str(path.relative_to(root))] = found
    return hits


@pytest.fixture
def work() -> Iterator[Path]:
    """The demo's directory, where the pods' user can reach their volumes (pytest's own
    temporary directories are private to root)."""
    work = Path(tempfile.mkdtemp(prefix="telerad-demo-test-"))
    work.chmod(0o755)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.reliability(
    "attack", "patient names, IDs, accession numbers in logs, events, status, metrics"
)
@pytest.mark.reliability(
    "attack", "gateways and workers as their pods' user, root file system read-only"
)
def test_the_demo_shows_the_whole_system_and_leaves_nothing_running(work: Path) -> None:
    telerad = str(Path(sys.executable).parent / "telerad")
    done = subprocess.run(
        [telerad, "demo", f"--bin-dir={k8s_bin_dir()}", f"--keep={work}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "routingpolicy.telerad.io/default-routing   True       True" in out
    # Both studies read, stat and critical, with an SR each and the alerts delivered.
    assert out.count("done CRITICAL") == 2
    assert out.count("SR series 'AI ") == 2
    assert out.count("critical-finding from st-marys") == 2
    assert "signed True" in out
    assert out.count("Autoscaling True (Active)") == 2
    # Each gateway and worker ran as its pod's security context says, which a process
    # that needs root or writes outside its volumes does not survive (read from /proc).
    confined = "user 10001, root file system read-only"
    if os.geteuid() == 0:
        assert out.count(confined) == 4, out
    else:
        assert out.count("not confined (confining a process needs root") == 4, out
    # Every process it started is gone: their logs are closed and no pid is alive.
    alive = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True, check=False)
    assert alive.stdout == "", alive.stdout

    # No patient data in what the system says about itself: every process's log, every
    # event and status of the cluster, every /metrics, and the demo's own output.
    phi = phi_of(work / "studies")
    assert len(phi) >= 6, phi
    outputs = {"logs", "outputs"}
    assert {p.name for p in work.iterdir()} >= outputs
    for name in outputs:
        assert holding(work / name, phi) == {}
    assert not {v for v in phi if v in out}
    # The search itself finds them where they belong: in the stored studies.
    assert holding(work / "pods", phi) != {}
