"""Encryption at rest, end to end, on a gateway of the example configuration (which seals
every instance): what the disk shows after a session, what the wrong key gets, and keys
rotated under load and rewrapped, `rewrap` killed halfway and run again."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import threading
from pathlib import Path

import httpx2 as httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from telerad import synthetic
from telerad.runtime.store.envelope import CURRENT, Keyring, open_file

from .conftest import (
    ANY_TRANSFER,
    ON_DISK,
    TELERAD,
    GatewayProcess,
    parts,
    send_datasets,
    stored,
    stow,
)

CATALOG_FILES = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm")
"""What of the hot tier is the embedded catalog: its indexed attributes are the database's
to protect (docs/encryption.md), so it is the one thing the search leaves out."""


def patients(n: int, seed: int) -> list[Dataset]:
    """A CT series of one patient with identifiers no other test uses."""
    tag = secrets.token_hex(4).upper()
    series = list(synthetic.ct_series(n_slices=n, size=32, seed=seed))
    for ds in series:
        ds.PatientName = f"ZEBRA{tag}^QUILL"
        ds.PatientID = f"MRN{tag}"
        ds.AccessionNumber = f"ACC{tag}"
    return series


def needles(datasets: list[Dataset]) -> dict[bytes, str]:
    """What must not be readable on disk: the identifiers, the UIDs, and 64 bytes from the
    middle of each instance's pixel data."""
    found = {}
    for ds in datasets:
        for name in ("PatientName", "PatientID", "AccessionNumber"):
            found[str(ds.get(name)).encode()] = name
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            found[str(ds.get(name)).encode()] = name
        middle = len(ds.PixelData) // 2
        found[bytes(ds.PixelData[middle : middle + 64])] = "pixel data"
    return found


def on_disk(gateway: GatewayProcess, *more: Path) -> dict[Path, bytes]:
    """Every file of the gateway's tiers (and of `more`, the S3 server's bucket) but the
    embedded catalog, as raw bytes."""
    roots = [gateway.hot, gateway.config.storage.warm_dir, *more]
    return {
        path: path.read_bytes()
        for root in roots
        if root is not None and root.exists()
        for path in root.rglob("*")
        if path.is_file() and path.name not in CATALOG_FILES
    }


def encoded(ds: Dataset) -> bytes:
    out = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def retrieve(gateway: GatewayProcess, study: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}/studies/{study}",
        headers={**gateway.auth, "Accept": ANY_TRANSFER},
        timeout=60,
    )


def key_ids(gateway: GatewayProcess) -> list[str]:
    """The key id each stored file's data key is wrapped with."""
    encryption = gateway.config.storage.encryption
    assert encryption is not None
    keyring = Keyring(encryption.key_dir)
    ids = []
    for path in sorted((gateway.hot / "studies").rglob("*.dcm")):
        source, opened = open_file(path, keyring)
        with source:
            ids.append(opened.slot.key_id)
    return ids


def test_a_session_leaves_nothing_of_its_patients_readable_on_the_tiers(
    gateway: GatewayProcess, hot_tier: str, request: pytest.FixtureRequest
) -> None:
    series = patients(6, seed=31)
    assert send_datasets(gateway, series[:3]) == [0, 0, 0]
    answer = stow(gateway, [encoded(ds) for ds in series[3:]])
    assert answer.status_code == 200, answer.text
    study = str(series[0].StudyInstanceUID)

    served = {
        str(part.SOPInstanceUID): part
        for _, body in parts(retrieve(gateway, study))
        for part in [pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))]
    }
    assert set(served) == {str(ds.SOPInstanceUID) for ds in series}
    for ds in series:
        back = served[str(ds.SOPInstanceUID)]
        assert back.PixelData == ds.PixelData
        assert str(back.PatientName) == str(ds.PatientName)

    # versitygw keeps a bucket as a directory of its data directory, an object as a file.
    bucket = request.getfixturevalue("s3") if hot_tier == "s3" else None
    files = on_disk(gateway, *([bucket.server.data_dir / bucket.name] if bucket else []))
    assert len([p for p in files if p.suffix == ".dcm"]) == len(series)
    if gateway.config.catalog.url is None:  # SQLite in the hot tier
        assert (gateway.hot / CATALOG_FILES[0]).exists(), "the one file left out must be there"
    for needle, what in needles(series).items():
        leaks = [p.name for p, raw in files.items() if needle in raw]
        assert not leaks, f"{what} readable in {leaks}"


def test_the_wrong_key_fails_loudly_and_serves_nothing(gateway: GatewayProcess) -> None:
    series = patients(3, seed=32)
    assert send_datasets(gateway, series) == [0, 0, 0]
    study = str(series[0].StudyInstanceUID)
    encryption = gateway.config.storage.encryption
    assert encryption is not None
    gateway.stop()
    current = (encryption.key_dir / CURRENT).read_text().strip()
    # The same key id, another key: a restored backup's keyring that is not this site's.
    (encryption.key_dir / current).write_text(base64.b64encode(os.urandom(32)).decode())
    gateway.start()

    answer = retrieve(gateway, study)
    assert answer.status_code == 500, answer.text
    assert "cannot be opened" in answer.json()["detail"]
    metadata = httpx.get(f"{gateway.url}/studies/{study}/metadata", headers=gateway.auth)
    assert metadata.status_code == 500
    for needle in needles(series):
        assert needle not in answer.content and needle not in metadata.content
    # The catalog still answers; nothing is taken for a new version of what it cannot read.
    assert gateway.get("/studies", StudyInstanceUID=study)
    assert send_datasets(gateway, series[:1]) == [0xA700]
    assert len(stored(gateway)) == 3
    log = gateway.log.read_text()
    assert "does not open its data key" in log
    assert str(series[0].PatientName) not in log and study not in log


def storage_command(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(TELERAD), "storage", *args, "--config", str(gateway.config_path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.timeout(600)
@pytest.mark.reliability("fault", "key rotation under load; rewrap killed halfway and rerun")
@ON_DISK
def test_keys_rotate_under_load_and_a_killed_rewrap_finishes_when_run_again(
    gateway: GatewayProcess,
) -> None:
    instances = list(synthetic.small_instances(n=400, size=8, n_series=4))
    statuses: list[int] = []

    def load() -> None:
        for start in range(0, len(instances), 50):
            statuses.extend(send_datasets(gateway, instances[start : start + 50]))

    sender = threading.Thread(target=load)
    sender.start()
    gateway.wait_for(lambda: len(stored(gateway)) >= 100, timeout=120)
    added = storage_command(gateway, "add-key", "key-2")
    assert added.returncode == 0, added.stderr
    sender.join(300)
    assert statuses == [0] * len(instances), "a store failed while the key rotated"
    ids = key_ids(gateway)
    assert len(ids) == len(instances)
    assert {"key-1", "key-2"} <= set(ids), "the new key must take over without a restart"

    argv = [str(TELERAD), "storage", "rewrap", "--config", str(gateway.config_path)]
    rewrap = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert rewrap.stderr is not None
    for line in rewrap.stderr:
        if "100 files looked at" in line:
            rewrap.send_signal(signal.SIGKILL)
            break
    rewrap.wait(60)
    assert rewrap.returncode == -signal.SIGKILL
    assert "key-1" in key_ids(gateway), "the kill must land halfway"

    again = storage_command(gateway, "rewrap")
    assert again.returncode == 0, again.stderr
    assert f"of {len(instances)} files rewrapped" in again.stdout
    assert set(key_ids(gateway)) == {"key-2"}
    encryption = gateway.config.storage.encryption
    assert encryption is not None
    (encryption.key_dir / "key-1").unlink()  # retired: everything opens without it
    study = str(instances[0].StudyInstanceUID)
    answer = retrieve(gateway, study)
    assert answer.status_code == 200, answer.text
    served = {
        str(ds.SOPInstanceUID): ds.PixelData
        for _, body in parts(answer)
        for ds in [pydicom.dcmread(pydicom.filebase.DicomBytesIO(body))]
    }
    assert served == {str(ds.SOPInstanceUID): ds.PixelData for ds in instances}
