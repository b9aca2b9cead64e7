"""Several gateways of one site behind a load balancer (issue 19): one PostgreSQL catalog,
the hot tier in one bucket, HAProxy in front as a Service would be, senders that never
retry. PostgreSQL and S3 only: that is what a site with replicas runs on."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pydicom
import pytest

from telerad import synthetic
from telerad.api.site import Completion
from tests.haproxy import HAProxy

from .conftest import (
    GatewayFactory,
    GatewayProcess,
    dataset_bytes,
    retrieved,
    stored,
    stow_body,
)
from .test_shared_catalog import new_catalog  # noqa: F401  (the fixture: one PostgreSQL)

pytestmark = pytest.mark.parametrize("hot_tier", ["s3"])
SLICES = 4  # per association and per STOW request
SAMPLE = 20  # every 20th instance acknowledged is retrieved


def replica(start_gateway: GatewayFactory, first: GatewayProcess) -> GatewayProcess:
    """Another gateway of `first`'s site, as the operator renders a replica: the same
    catalog, bucket, keyring and client tokens; its own staging directory and ports."""
    return start_gateway(
        site=first.config.site,
        completion=first.config.completion,
        catalog=first.config.catalog,
        tokens_dir=first.config.tokens_dir,
        unready_seconds=first.config.unready_seconds,
        storage={
            "hot_store": first.config.storage.hot_store,
            "warm_dir": first.config.storage.warm_dir,
            "encryption": first.config.storage.encryption,
            "sweep_grace_seconds": None,  # a shared catalog's default
        },
    )


@pytest.fixture
def site(
    start_gateway: GatewayFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[GatewayProcess], HAProxy]]:
    # Still accepting for a second after SIGTERM: HAProxy checks every 200 ms.
    first = start_gateway(
        completion=Completion(quiet_seconds=2),
        unready_seconds=1,
        # A restarted replica's start-up sweep must leave the others' objects in flight.
        storage={"sweep_grace_seconds": None},
    )
    gateways = [first, replica(start_gateway, first), replica(start_gateway, first)]
    front = HAProxy(
        tmp_path_factory.mktemp("haproxy"), [(g.port, g.config.http_port) for g in gateways]
    )
    front.settle()
    yield gateways, front
    front.close()


@dataclass
class Traffic:
    """Senders that go on until told to stop, and what each was told."""

    front: HAProxy
    ae_title: str
    auth: dict[str, str]
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    """(study, series, SOP instance, the data set after its file meta) of each instance a
    sender was told is stored."""
    failures: list[str] = field(default_factory=list)
    rounds: itertools.count[int] = field(default_factory=itertools.count)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, associations: int, stow_clients: int) -> None:
        targets: list[Callable[[], None]] = [self._dimse] * associations
        targets += [self._stow] * stow_clients
        self.threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        assert not any(t.is_alive() for t in self.threads), "a sender hung"

    def _study(self) -> list[tuple[pydicom.Dataset, bytes]]:
        """A new small study: each data set and its Part 10 file."""
        study = synthetic.ct_series(n_slices=SLICES, size=32, seed=next(self.rounds))
        return [(ds, _part10(ds)) for ds in study]

    def _keep(self, study: list[tuple[pydicom.Dataset, bytes]]) -> None:
        for ds, part10 in study:
            key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            self.acknowledged.append((*key, dataset_bytes(part10)[1]))

    def _dimse(self) -> None:
        # dcmtk's storescu, a process per association: pynetdicom's own associations,
        # run from threads of one process, lose a request now and then (pynetdicom
        # issue 850): the sender's stall, not the gateway's.
        with tempfile.TemporaryDirectory() as scratch:
            while not self.stop.is_set():
                study = self._study()
                files = []
                for i, (_, part10) in enumerate(study):
                    path = Path(scratch) / f"{i}.dcm"
                    path.write_bytes(part10)
                    files.append(str(path))
                sent = subprocess.run(
                    [
                        "storescu",
                        "-aet",
                        "PYNETDICOM",
                        "-aec",
                        self.ae_title,
                        "-to",
                        "30",
                        "127.0.0.1",
                        str(self.front.dicom_port),
                        *files,
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                    env={**os.environ, "TCP_NODELAY": "1"},
                )
                if sent.returncode != 0:
                    self.failures.append(f"storescu: {sent.returncode}: {sent.stderr[-300:]}")
                    continue
                self._keep(study)

    def _stow(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                study = self._study()
                content, kind = stow_body([part10 for _, part10 in study])
                try:
                    response = client.post(
                        f"{self.front.url}/studies",
                        content=content,
                        headers={**self.auth, "Content-Type": kind},
                    )
                except httpx.HTTPError as exc:
                    self.failures.append(f"STOW: {type(exc).__name__}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"STOW: {response.status_code}")
                    continue
                self._keep(study)


def _part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_a_rolling_restart_of_three_gateways_fails_no_sender_and_loses_nothing(
    site: tuple[list[GatewayProcess], HAProxy],
) -> None:
    gateways, front = site
    traffic = Traffic(front, gateways[0].ae_title, gateways[0].auth)
    traffic.start(associations=8, stow_clients=2)
    time.sleep(2)
    for gateway in gateways:
        # As a rollout does: SIGTERM one, start its successor, wait until it is ready.
        before = len(traffic.acknowledged)
        gateway.stop()
        gateway.start()
        front.settle()
        # Traffic went on meanwhile, through the two others.
        assert len(traffic.acknowledged) > before
    time.sleep(1)
    traffic.finish()
    assert traffic.failures == []
    assert len(traffic.acknowledged) >= 3 * SLICES
    # Everything acknowledged is catalogued (a thousand or more), and what a gateway
    # serves is what was sent, byte for byte, from whichever is asked.
    catalogued = {s.sop_uid for s in stored(gateways[0])}
    assert {sop for _, _, sop, _ in traffic.acknowledged} <= catalogued
    for i, (study, series, sop, body) in enumerate(traffic.acknowledged[::SAMPLE]):
        assert retrieved(gateways[i % 3], study, series, sop) == body
