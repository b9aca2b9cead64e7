"""kill -9 of the gateway in the middle of its work: a 300-slice CT over C-STORE, STOW-RS
requests from several clients, a study's move to the warm tier. After the restart every
instance a sender was told is stored is there, byte-identical and catalogued once; the rest
can simply be sent again."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pydicom
import pytest

from telerad import synthetic

from .conftest import (
    ON_DISK,
    GatewayFactory,
    GatewayProcess,
    age_studies,
    assert_kept,
    env_nodelay,
    stored,
    stow,
    temporaries,
    tool,
)
from .conftest import storescu as send_all

SLICES = 300
KILL_AFTER = 60


def storescu(gateway: GatewayProcess, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            tool("storescu"),
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            gateway.ae_title,
            "127.0.0.1",
            str(gateway.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_nodelay(),
    )


def acknowledged(lines: list[str]) -> list[Path]:
    """Files storescu reported as stored: a "Sending file" followed by a success response."""
    done, current = [], None
    for line in lines:
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


@pytest.mark.reliability("fault", "kill -9 of the gateway during C-STORE")
@pytest.mark.timeout(300)
def test_kill_9_mid_study_loses_no_acknowledged_instance(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=SLICES, size=512, seed=7), tmp_path / "ct"
    )
    assert len(files) == SLICES
    sender = storescu(gateway, files)
    assert sender.stdout is not None
    lines: list[str] = []
    killed = threading.Event()
    for line in sender.stdout:
        lines.append(line)
        if not killed.is_set() and len(acknowledged(lines)) >= KILL_AFTER:
            gateway.kill()
            killed.set()
    sender.wait(60)
    assert killed.is_set(), "storescu finished before the gateway could be killed"
    acked = acknowledged(lines)
    assert KILL_AFTER <= len(acked) < SLICES, "the kill must land mid-study"
    assert sender.returncode != 0, "storescu must notice the gateway died"

    gateway.start()
    catalogued = assert_kept(gateway, acked)
    # What was caught mid-write was never acknowledged: no temporary file survives the
    # restart, nor a file written but not catalogued (its sender was never told it is
    # stored; the start sweeps it, and sending it again stores it as version 1).
    assert not temporaries(gateway.hot)
    assert len(gateway.objects()) == len(catalogued)

    # The sender simply sends the whole series again.
    again = storescu(gateway, files)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output[-2000:]
    versions = stored(gateway)
    assert (len(versions), len({v.sop_uid for v in versions})) == (SLICES, SLICES)
    assert {v.version for v in versions} == {1}, (
        "a re-send of a file the crash left became a second version"
    )


STOW_CLIENTS = 4
STOW_KILL_AFTER = 40


@pytest.mark.reliability("fault", "kill -9 of the gateway during STOW-RS")
@pytest.mark.timeout(300)
def test_kill_9_during_stow_loses_no_acknowledged_instance(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """Four clients STOW one instance per request and a fifth sends 60 in one request; the
    gateway dies mid-stream. A 200 is the only acknowledgement: each instance that got one
    is kept, the big request got none, and sending everything again leaves each instance
    catalogued once."""
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=200, size=512, seed=11), tmp_path / "ct"
    )
    single, bulk = files[:140], files[140:]
    acknowledged: list[Path] = []
    lock = threading.Lock()
    killed = threading.Event()

    def client(share: list[Path]) -> None:
        for path in share:
            if killed.is_set():
                return
            try:
                answer = stow(gateway, [path.read_bytes()])
            except httpx.TransportError:
                return
            assert answer.status_code == 200, answer.text
            with lock:
                acknowledged.append(path)

    def bulk_client() -> int | None:
        try:
            return stow(gateway, [p.read_bytes() for p in bulk]).status_code
        except httpx.TransportError:
            return None

    with ThreadPoolExecutor(STOW_CLIENTS + 1) as pool:
        big = pool.submit(bulk_client)
        clients = [pool.submit(client, single[i::STOW_CLIENTS]) for i in range(STOW_CLIENTS)]
        deadline = time.monotonic() + 120
        while len(acknowledged) < STOW_KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.01)
        gateway.kill()
        killed.set()
        for future in clients:
            future.result()
        bulk_answer = big.result()
    assert STOW_KILL_AFTER <= len(acknowledged) < len(single), "the kill must land mid-stream"

    gateway.start()
    catalogued = assert_kept(gateway, acknowledged + (bulk if bulk_answer == 200 else []))
    assert not temporaries(gateway.hot)
    # The instances in flight (one per client, plus the bulk request's) were never
    # acknowledged: what of them reached the tier uncatalogued, the start swept.
    assert len(gateway.objects()) == len(catalogued)

    for start in range(0, len(files), 25):
        answer = stow(gateway, [p.read_bytes() for p in files[start : start + 25]])
        assert answer.status_code == 200, answer.text
    versions = stored(gateway)
    assert (len(versions), len({v.sop_uid for v in versions})) == (len(files), len(files))


@pytest.mark.reliability("fault", "kill -9 of the gateway during a move to the warm tier")
@pytest.mark.timeout(300)
@ON_DISK
def test_kill_9_mid_move_to_warm_keeps_one_good_copy(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The move copies durably, switches the catalog, then frees the hot copy. Killed
    halfway, the next pass finishes it: each instance ends catalogued once, on the warm
    tier, readable and byte-identical, with no copy or temporary left on the hot tier."""
    gateway = start_gateway(storage={"lifecycle_interval_seconds": 1})
    warm = gateway.config.storage.warm_dir
    assert warm is not None
    files = synthetic.write_series(
        synthetic.ct_series(n_slices=SLICES, size=512, seed=9), tmp_path / "ct"
    )
    send_all(gateway, files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    # Complete before the stop: a study still receiving waits a fresh quiet window after
    # a start, and only complete studies move.
    gateway.wait_for(lambda: gateway.metric("telerad_gateway_studies_completed_total") == 1)
    gateway.stop()
    # Eight days old: past the site's seven days on the hot tier, inside its retention.
    age_studies(gateway, 8 * 86400)

    gateway.launch()  # the first lifecycle pass runs at once
    deadline = time.monotonic() + 60
    while len(list((warm / "studies").rglob("*.dcm"))) < SLICES // 3:
        assert time.monotonic() < deadline, gateway.log_tail()
        time.sleep(0.005)
    gateway.kill()
    left_hot = list((gateway.hot / "studies").rglob("*.dcm"))
    assert left_hot, "the kill must land before the move freed the hot copy"

    gateway.start()
    gateway.wait_for(lambda: not list((gateway.hot / "studies").rglob("*.dcm")))
    assert {v.tier for v in stored(gateway)} == {"warm"}
    assert_kept(gateway, files)
    assert len(list((warm / "studies").rglob("*.dcm"))) == SLICES
    assert not temporaries(gateway.hot, warm)
    metadata = gateway.get(f"/studies/{study}/metadata")
    assert len(metadata) == SLICES
