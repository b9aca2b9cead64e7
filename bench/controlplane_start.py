"""Warm start of the local control plane, as `make cluster` runs it.

For each run: launch `python -m telerad.devcluster up` on a fresh state directory, poll
`kubectl get nodes` every 100 ms, and record the seconds to the first successful answer
and to the command returning (all four fake nodes Ready and untainted, controllers up).
Then `down`. Prints a Markdown table for bench/RESULTS.md.

    make bench      # or: .venv/bin/python bench/controlplane_start.py --bin-dir DIR --runs 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(bin_dir: Path, state: Path) -> tuple[float, float]:
    kubeconfig = state / "kubeconfig"
    start = time.monotonic()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "telerad.devcluster",
            "up",
            "--dir",
            str(state),
            "--bin-dir",
            str(bin_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_get = None
    try:
        while first_get is None:
            if kubeconfig.exists():
                got = subprocess.run(
                    [
                        bin_dir / "kubectl",
                        f"--kubeconfig={kubeconfig}",
                        "get",
                        "nodes",
                        "--request-timeout=2s",
                    ],
                    capture_output=True,
                    check=False,
                )
                if got.returncode == 0:
                    first_get = time.monotonic() - start
                    break
            if up.poll() not in (None, 0):
                raise SystemExit(f"devcluster up failed:\n{up.stderr.read() if up.stderr else ''}")
            time.sleep(0.1)
        up.wait(timeout=300)
        ready = time.monotonic() - start
        if up.returncode != 0:
            raise SystemExit(f"devcluster up failed:\n{up.stderr.read() if up.stderr else ''}")
    finally:
        subprocess.run(
            [sys.executable, "-m", "telerad.devcluster", "down", "--dir", str(state)],
            capture_output=True,
            check=False,
        )
    return first_get, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    firsts, readies = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="telerad-bench-") as tmp:
            first, ready = one_run(args.bin_dir, Path(tmp) / "cluster")
        firsts.append(first)
        readies.append(ready)
        print(
            f"run {i + 1}: first `kubectl get nodes` {first:.2f}s, ready {ready:.2f}s",
            file=sys.stderr,
        )

    def row(name: str, xs: list[float]) -> str:
        return f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |"

    print(f"{args.runs} runs, {platform.machine()}, Python {platform.python_version()}")
    print()
    print("| seconds from `up` | median | min | max |")
    print("|---|---|---|---|")
    print(row("first successful `kubectl get nodes`", firsts))
    print(row("ready (4 nodes schedulable, controllers up)", readies))


if __name__ == "__main__":
    main()
