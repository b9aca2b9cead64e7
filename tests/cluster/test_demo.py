"""`make demo` stays working: the README's "run it" command, end to end, in the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import k8s_bin_dir


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
