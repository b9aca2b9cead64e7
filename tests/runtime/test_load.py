"""Load: 20 associations (dcmtk's storescu) sending CT heads at once, STOW-RS clients
beside them, and workers claiming the jobs those studies make, for TELERAD_LOAD_SECONDS
(20 in the suite; the 2-minute run is recorded in RELIABILITY.md). Nothing may fail, every
acknowledged instance must be catalogued once, every study must get its one job, done, and
the gateway's memory must stay flat: its peak in the second half no more than a quarter
above the first half's.

With TELERAD_LOAD_REPORT=FILE the run's figures (instances, studies, jobs, peak RSS by
half) are written to FILE as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite

from telerad import synthetic
from telerad.api.site import Completion
from telerad.runtime.gateway.openapi import MAX_PAGE

from .conftest import GatewayFactory, GatewayProcess, env_nodelay, stored, stow, tool
from .test_crash import acknowledged

ASSOCIATIONS = 20
STOW_CLIENTS = 2
WORKERS = 2
SLICES = 8  # per study: small images, so the load is in the protocol and the catalog


def seconds() -> float:
    return float(os.environ.get("TELERAD_LOAD_SECONDS", "20"))


@dataclass
class Tally:
    """What the senders were told, shared by their threads."""

    stored: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, study: str, sops: list[str]) -> None:
        with self.lock:
            self.studies.add(study)
            self.stored.update(sops)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the receiver processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for member in family:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def study(seed: int) -> list[Any]:
    return list(synthetic.ct_series(n_slices=SLICES, size=64, seed=seed))


def dimse_sender(
    gateway: GatewayProcess, index: int, until: float, tally: Tally, work: Path
) -> None:
    """One storescu association per study, one study after another, like a modality."""
    number = 0
    while time.monotonic() < until:
        datasets = study(100_000 * (index + 1) + number)
        files = synthetic.write_series(datasets, work / f"{index}-{number}")
        number += 1
        command = [tool("storescu"), "-v", "-aet", "STORESCU", "-aec", gateway.ae_title]
        command += ["127.0.0.1", str(gateway.port), *map(str, files)]
        done = subprocess.run(
            command, capture_output=True, text=True, env=env_nodelay(), timeout=120, check=False
        )
        acked = acknowledged(done.stdout.splitlines() + done.stderr.splitlines())
        if done.returncode != 0 or len(acked) != len(files):
            output = (done.stdout + done.stderr)[-600:]
            tally.error(
                f"storescu {index}: rc {done.returncode}, {len(acked)} of {len(files)}:\n{output}"
            )
            return
        tally.add(str(datasets[0].StudyInstanceUID), [str(ds.SOPInstanceUID) for ds in datasets])


def all_jobs(gateway: GatewayProcess) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    while page := gateway.get("/jobs", limit=MAX_PAGE, offset=len(jobs)):
        jobs += page
    return jobs


def encoded(ds: Any) -> bytes:
    out = DicomBytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def stow_sender(gateway: GatewayProcess, index: int, until: float, tally: Tally) -> None:
    number = 0
    while time.monotonic() < until:
        datasets = study(900_000_000 + 100_000 * index + number)
        number += 1
        answer = stow(gateway, [encoded(ds) for ds in datasets])
        if answer.status_code != 200:
            tally.error(f"STOW-RS client {index}: {answer.status_code} {answer.text[:200]}")
            return
        tally.add(str(datasets[0].StudyInstanceUID), [str(ds.SOPInstanceUID) for ds in datasets])


@pytest.mark.reliability("load", "20 associations and 2 STOW-RS clients at once, 2 workers")
@pytest.mark.timeout(900)
def test_load_loses_nothing_and_memory_stays_flat(
    start_gateway: GatewayFactory, start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    gateway = start_gateway(completion=Completion(quiet_seconds=1))
    for _ in range(WORKERS):
        start_worker(gateway)
    assert gateway.proc is not None
    tally = Tally()
    duration = seconds()
    began = time.monotonic()
    until = began + duration
    senders = [
        threading.Thread(target=dimse_sender, args=(gateway, i, until, tally, tmp_path))
        for i in range(ASSOCIATIONS)
    ] + [
        threading.Thread(target=stow_sender, args=(gateway, i, until, tally))
        for i in range(STOW_CLIENTS)
    ]
    for sender in senders:
        sender.start()
    samples: list[tuple[float, int]] = []
    while any(s.is_alive() for s in senders):
        samples.append((time.monotonic() - began, tree_rss(gateway.proc.pid)))
        time.sleep(0.5)
    for sender in senders:
        sender.join()
    assert not tally.errors, "\n".join(tally.errors)
    assert gateway.proc.poll() is None, gateway.log_tail()

    # Every instance a sender was told is stored is catalogued, once.
    # (The workers' SRs, stored meanwhile, are results, not what was sent.)
    catalogued = [v.sop_uid for v in stored(gateway) if v.result_of is None]
    assert len(catalogued) == len(set(catalogued)) == len(tally.stored)
    assert set(catalogued) == tally.stored

    # Every study gets its one job, and the workers finish them all.
    def finished() -> bool:
        jobs = all_jobs(gateway)
        return len(jobs) == len(tally.studies) and all(j["state"] == "done" for j in jobs)

    gateway.wait_for(finished, timeout=300)
    jobs = all_jobs(gateway)
    assert sorted(j["studyUid"] for j in jobs) == sorted(tally.studies)

    half = duration / 2
    first = max(rss for at, rss in samples if at <= half)
    second = max(rss for at, rss in samples if at > half)
    figures = {
        "seconds": duration,
        "associations": ASSOCIATIONS,
        "stow_clients": STOW_CLIENTS,
        "workers": WORKERS,
        "instances": len(tally.stored),
        "studies": len(tally.studies),
        "jobs_done": len(jobs),
        "peak_rss_first_half_mib": round(first / 2**20, 1),
        "peak_rss_second_half_mib": round(second / 2**20, 1),
    }
    print(json.dumps(figures))
    if report := os.environ.get("TELERAD_LOAD_REPORT"):
        Path(report).write_text(json.dumps(figures, indent=2) + "\n")
    assert second <= first * 1.25, figures
