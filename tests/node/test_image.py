"""The image built from the Dockerfile (`make image`), run by the local containerd: who it
runs as, that a read-only root filesystem is enough for it, that every entrypoint starts,
and how big it is. Everything is read from inside a container, not from the Dockerfile."""

from __future__ import annotations

import pytest

from tests.node.conftest import Image

# The first test to ask for the image may build it from nothing (debootstrap included:
# about 6 minutes on the shared 2-core machine, bench/RESULTS.md).
pytestmark = pytest.mark.timeout(1500)

ENTRYPOINTS = ([], ["operator"], ["gateway"], ["worker"], ["crds"], ["token"])


def test_the_image_runs_as_uid_10001_not_root(image: Image) -> None:
    done = image.run("id")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["uid=10001(telerad)", "gid=10001(telerad)"], done.stdout


def test_the_root_filesystem_is_read_only_and_tmp_is_the_only_place_written(image: Image) -> None:
    done = image.run("sh", "-c", "touch /opt/telerad/x; touch /tmp/x && echo tmp-written")
    assert "Read-only file system" in done.stderr, done.stderr
    assert done.stdout.strip() == "tmp-written"


@pytest.mark.parametrize("command", ENTRYPOINTS, ids=lambda c: " ".join(["telerad", *c]))
def test_every_entrypoint_starts_on_a_read_only_root(image: Image, command: list[str]) -> None:
    done = image.run("telerad", *command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: telerad" in done.stdout


def test_the_image_default_command_is_telerad_help(image: Image) -> None:
    done = image.run(tmp=False)
    assert done.returncode == 0, done.stderr
    assert "Usage: telerad" in done.stdout


def test_the_image_size_is_recorded(image: Image, record_property: pytest.RecordProperty) -> None:
    # The unpacked root filesystem, as a node stores it (bench/RESULTS.md keeps the figure);
    # the few directories only root may read (/root, /etc/ssl/private) are empty.
    done = image.run("sh", "-c", "du -sxm / 2>/dev/null; true")
    size_mb = int(done.stdout.split()[0])
    record_property("image_size_mb", size_mb)
    print(f"{image.ref}: {size_mb} MB unpacked")
    assert 100 < size_mb < 2000, "a Python 3.11 base with telerad's wheels; not the CUDA image"
