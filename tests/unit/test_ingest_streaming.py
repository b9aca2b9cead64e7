"""Ingest of a data set as it arrives (`Ingest.begin`, `Incoming.write`, `Ingest.finish`),
on real files: what is stored, what is left in the incoming directory (nothing), and the
paths that take the received file over or must copy it."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from pydicom.uid import generate_uid

from telerad.runtime.dataset import StoreStatus
from telerad.runtime.gateway.ingest import meta_length

from .test_runtime_store import CT, CT_CLASS, EXPLICIT, Site, _encode, store_bytes


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def incoming_files(site: Site) -> list[str]:
    root = site.hot.root / "incoming"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_fragments_are_stored_as_one_data_set_and_nothing_stays_behind(site: Site) -> None:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    body = _encode(ds)
    incoming = site.ingest.begin(EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "MODALITY")
    for start in range(0, len(body), 1000):
        incoming.write(body[start : start + 1000])
    assert incoming_files(site) != []  # written as it came
    outcome = site.ingest.finish(incoming)
    assert outcome.status == StoreStatus.SUCCESS
    (stored,) = site.catalog.versions(ds.SOPInstanceUID)
    raw = site.hot.read(PurePosixPath(stored.path))
    assert raw[meta_length(raw) :] == body
    assert incoming_files(site) == []


def test_a_data_set_naming_another_instance_than_its_request_is_stored_under_its_own(
    site: Site,
) -> None:
    """The file meta was written behind the announced UIDs; the data set decides, so the
    file is copied behind the right file meta (on disk, a chunk at a time)."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    announced = generate_uid()
    body = _encode(ds)
    outcome = store_bytes(site.ingest, body, EXPLICIT, CT_CLASS, announced, "MODALITY")
    assert outcome.status == StoreStatus.SUCCESS
    assert site.catalog.versions(announced) == []
    (stored,) = site.catalog.versions(ds.SOPInstanceUID)
    path = site.hot.path(PurePosixPath(stored.path))
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    raw = path.read_bytes()
    assert raw[meta_length(raw) :] == body
    assert incoming_files(site) == []


def test_a_resend_is_compared_with_what_is_stored(site: Site) -> None:
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    body = _encode(ds)
    changed = body[:-2] + bytes([body[-2] ^ 1]) + body[-1:]  # same size, one bit apart
    for data in (body, body, changed):
        assert (
            store_bytes(site.ingest, data, EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X").status == 0
        )
    assert [v.version for v in site.catalog.versions(ds.SOPInstanceUID)] == [1, 2]
    assert incoming_files(site) == []


def test_a_data_set_past_the_room_is_dropped_as_it_comes(site: Site) -> None:
    incoming = site.ingest.begin(EXPLICIT, CT_CLASS, generate_uid(), "X")
    incoming.room = 1000  # as if the tier had 1000 bytes above its watermark
    incoming.write(b"\0" * 600)
    assert incoming_files(site) != []
    incoming.write(b"\0" * 600)
    assert incoming_files(site) == []  # gone at once, not at the end
    outcome = site.ingest.finish(incoming)
    assert outcome.status == StoreStatus.OUT_OF_RESOURCES
    assert outcome.comment == "data set of 1200 bytes does not fit"


def test_what_a_crash_leaves_in_the_incoming_directory_is_swept(site: Site) -> None:
    incoming = site.ingest.begin(EXPLICIT, CT_CLASS, generate_uid(), "X")
    incoming.write(b"\0" * 1000)  # then the process dies: nobody finishes it
    assert len(incoming_files(site)) == 1
    # Written just now: as far as a sweep with a grace period knows, a peer's store.
    assert site.hot.sweep_temporaries(time.time() - 60) == 0
    assert site.hot.sweep_temporaries(time.time() + 1) == 1
    assert incoming_files(site) == []
    incoming.discard()  # closes its descriptor; the file is gone already
