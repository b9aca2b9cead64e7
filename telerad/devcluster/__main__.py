"""``python -m telerad.devcluster up|down|status``: the local control plane behind
``make cluster`` and ``make cluster-down``."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from telerad.devcluster.controlplane import COMPONENTS, STATE_FILE, ControlPlane
from telerad.devcluster.process import ControlPlaneError


def _up(state_dir: Path, bin_dir: Path) -> int:
    running = dict(ControlPlane.running_processes(state_dir))
    if set(running) == set(COMPONENTS):
        print(f"control plane already running ({state_dir / STATE_FILE})", file=sys.stderr)
    else:
        if running:
            print(f"stopping a partial control plane: {', '.join(running)}", file=sys.stderr)
            ControlPlane.stop_detached(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        plane = ControlPlane(bin_dir=bin_dir, state_dir=state_dir)
        started = time.monotonic()
        try:
            plane.start()
        except ControlPlaneError as err:
            print(f"control plane failed to start: {err}", file=sys.stderr)
            return 1
        print(
            f"control plane up in {time.monotonic() - started:.1f}s at {plane.server}; "
            f"logs in {plane.logs_dir}",
            file=sys.stderr,
        )
    # Last line on stdout, so `eval "$(make cluster | tail -1)"` works.
    print(f"export KUBECONFIG={(state_dir / 'kubeconfig').resolve()}")
    return 0


def _down(state_dir: Path) -> int:
    stopped = ControlPlane.stop_detached(state_dir)
    left = list(ControlPlane.running_processes(state_dir))
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    if left:
        print(f"still running: {left}", file=sys.stderr)
        return 1
    return 0


def _status(state_dir: Path) -> int:
    running = dict(ControlPlane.running_processes(state_dir))
    for name in COMPONENTS:
        pid = running.get(name)
        print(f"{name:<24} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0 if set(running) == set(COMPONENTS) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telerad.devcluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".cluster"), help="state directory")
    parser.add_argument("--bin-dir", type=Path, help="binaries from hack/build-k8s.sh (for up)")
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.resolve()
    if args.command == "up":
        if args.bin_dir is None:
            parser.error("up needs --bin-dir (the directory hack/build-k8s.sh prints)")
        return _up(state_dir, args.bin_dir.resolve())
    if args.command == "down":
        return _down(state_dir)
    return _status(state_dir)


if __name__ == "__main__":
    sys.exit(main())
