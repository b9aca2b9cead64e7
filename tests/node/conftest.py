"""The local node's parts: its containerd (hack/containerd.sh) and the image `make image`
builds from the Dockerfile and imports there (hack/image.sh)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERD = ROOT / "hack" / "containerd.sh"


@dataclass(frozen=True)
class Image:
    ref: str

    def run(self, *command: str, tmp: bool = True) -> subprocess.CompletedProcess[str]:
        """Run COMMAND in a fresh container of the image with a read-only root filesystem,
        as the manifests run it (an emptyDir at /tmp: here a tmpfs), as the image's user."""
        mounts = ["--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev"] if tmp else []
        return subprocess.run(
            [str(CONTAINERD), "ctr", "run", "--rm", "--read-only", *mounts, self.ref,
             f"telerad-test-{secrets.token_hex(4)}", *command],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    status = subprocess.run([CONTAINERD, "status"], capture_output=True, check=False)
    was_running = status.returncode == 0
    built = subprocess.run(
        [ROOT / "hack" / "image.sh"], capture_output=True, text=True, check=False, timeout=1500
    )
    assert built.returncode == 0, built.stderr[-4000:]
    yield Image(built.stdout.strip().splitlines()[-1])
    if not was_running:
        subprocess.run([CONTAINERD, "stop"], check=True)
