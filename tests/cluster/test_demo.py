"""`make demo` stays working: the README's "run it" command, end to end, in the suite; and
what the whole system says about itself carries no patient data."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.reliability(
    "attack", "patient names, IDs, accession numbers in logs, events, status, metrics"
)
def test_the_demo_shows_the_whole_system_and_leaves_nothing_running(tmp_path: Path) -> None:
    work = tmp_path / "demo"
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
