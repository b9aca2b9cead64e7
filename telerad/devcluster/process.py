"""Supervision of the control plane's processes: one log file and process group each."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL_CHARS = 4000


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become ready; the message carries its log tail."""


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log written)"


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Process:
        with self.log.open("ab") as out:
            # Own session, so stopping the control plane signals exactly its own processes
            # and a Ctrl-C in the terminal that ran `make cluster` does not reach them.
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise ControlPlaneError(f"{self.name} was never started")
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with code {self.popen.returncode}; "
                f"log {self.log}, tail:\n{log_tail(self.log)}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None:
            return
        stop_group(self.popen.pid, timeout)
        self.popen.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every purpose here.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def executable_of(pid: int) -> Path | None:
    """The binary a live pid runs, so a stale pid file never gets a stranger killed."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe"))
    except (FileNotFoundError, PermissionError):
        return None
