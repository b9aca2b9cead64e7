"""A hot tier that really fills up: a tmpfs that runs out of inodes, so creating a file
meets ENOSPC from the kernel while the free-space check (tested in test_bad_input.py) still
sees room. A disk out of bytes is refused by that check before any write; this is the
fault it cannot see coming. Mounting needs root, as CI has."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from telerad import synthetic
from telerad.api.config import MIN_FREE_BYTES
from telerad.operator.builders.site import free_space_watermark

from .conftest import ON_DISK, GatewayFactory, assert_kept, send_datasets, stored, stow, temporaries

SLICES = 80
INODES = 60  # the catalog, its journal, the audit log and directories take a few


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "hot", f"size=256m,nr_inodes={INODES}") as mount:
        yield mount


def grow(mount: Path, inodes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,nr_inodes={inodes}", str(mount)], check=True)


@pytest.mark.reliability("fault", "hot tier full for real (ENOSPC: a tmpfs out of inodes)")
@pytest.mark.timeout(300)
@ON_DISK
def test_a_full_hot_tier_refuses_cleanly_and_recovers_when_it_grows(
    start_gateway: GatewayFactory, small_disk: Path, tmp_path: Path
) -> None:
    """Stores are answered Out of Resources once the disk is full, leave no file behind,
    and the gateway stays up; when the volume grows, the same instances go in once and the
    study gets its one job."""
    gateway = start_gateway(storage={"hot_dir": small_disk, "min_free_bytes": 0})
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=SLICES, size=512, seed=13), tmp_path / "ct"
    )
    datasets = [pydicom.dcmread(p) for p in files]
    statuses = send_datasets(gateway, datasets)
    assert set(statuses) <= {0x0000, 0xA700}, statuses
    acked = [path for path, status in zip(files, statuses, strict=True) if status == 0]
    assert 0 < len(acked) < SLICES, "the disk must fill up mid-study"
    # Once full, it stays full: nothing after the first refusal got in.
    assert statuses.index(0xA700) == len(acked)

    assert gateway.proc is not None and gateway.proc.poll() is None, gateway.log_tail()
    catalogued = assert_kept(gateway, acked)
    assert len(catalogued) == len(acked)
    assert len(list((small_disk / "studies").rglob("*.dcm"))) == len(acked)
    assert not temporaries(small_disk)
    assert gateway.metric("telerad_gateway_rejections_total") >= SLICES - len(acked)
    refused = stow(gateway, [files[-1].read_bytes()])
    assert refused.status_code != 200, "a STOW-RS on a full disk must not be acknowledged"
    assert "No space left on device" in gateway.log_tail(400), "the log must say why"

    grow(small_disk, 10_000)
    assert set(send_datasets(gateway, datasets)) == {0x0000}
    versions = stored(gateway)
    assert (len(versions), len({v.sop_uid for v in versions})) == (SLICES, SLICES)
    assert_kept(gateway, files)
    gateway.wait_for(lambda: len(gateway.get("/jobs")) >= 1)
    jobs = gateway.get("/jobs")
    assert [j["model"] for j in jobs] == ["ct-head-hyperdensity"], jobs


def test_a_1_gi_hot_tier_takes_stores_under_the_watermark_the_operator_renders(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A site whose hot tier is 1 Gi gets a watermark from that size: its volume (here a
    real 1 GiB filesystem) takes a study, where the fixed 1 GiB refused every store."""
    with tmpfs(tmp_path / "hot", "size=1g") as mount:
        watermark = free_space_watermark("1Gi")
        assert watermark < shutil.disk_usage(mount).free <= MIN_FREE_BYTES
        gateway = start_gateway(storage={"hot_dir": mount, "min_free_bytes": watermark})
        files = synthetic.write_series(
            synthetic.ct_series(n_slices=20, size=256, seed=21), tmp_path / "ct"
        )
        assert set(send_datasets(gateway, [pydicom.dcmread(p) for p in files])) == {0x0000}
        assert_kept(gateway, files)
        gateway.stop()
