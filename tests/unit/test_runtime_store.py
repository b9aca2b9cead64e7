"""Storage and the catalog in one process, on real files: durable writes, versions, the
lifecycle pass (hot -> warm -> cold -> deleted), and recovery from a pass cut short."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from telerad.api.config import COLD, HOT, WARM, CatalogConfig, GatewayConfig, StoragePaths
from telerad.runtime.dataset import StoreStatus
from telerad.runtime.gateway.deid import Deidentifier
from telerad.runtime.gateway.example import example_config
from telerad.runtime.gateway.flow import DAY, Flow
from telerad.runtime.gateway.ingest import Ingest, Outcome, file_meta
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.gateway.receivers import default_count
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.files import DiskTier, instance_path, study_dir
from telerad.runtime.store.search import Level, Search
from telerad.runtime.store.sql.catalog import SQLCatalog

CT = Path(str(get_testdata_file("CT_small.dcm")))
RAW = CT.read_bytes()
BODY = RAW[144 + int.from_bytes(RAW[140:144], "little") :]
EXPLICIT = "1.2.840.10008.1.2.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def store_bytes(  # noqa: PLR0917  (the receivers' own arguments)
    ingest: Ingest,
    data: bytes,
    transfer_syntax: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    calling_ae: str,
    *,
    study_uid: str | None = None,
    result_of: int | None = None,
) -> Outcome:
    """Store an encoded data set held in memory, as the receivers do with what arrives."""
    incoming = ingest.begin(transfer_syntax, sop_class_uid, sop_instance_uid, calling_ae)
    incoming.write(data)
    return ingest.finish(incoming, study_uid=study_uid, result_of=result_of)


class Site:
    def __init__(self, tmp: Path, catalog: CatalogConfig | None = None, **storage: object) -> None:
        config = example_config(11112, 8080, tmp)
        paths = config.storage.model_copy(update={"min_free_bytes": 0, **storage})
        self.config = GatewayConfig.model_validate(
            config.model_copy(update={"storage": paths}).model_dump()
        )
        paths = self.config.storage
        assert paths.warm_dir is not None
        self.hot, self.warm = DiskTier(HOT, paths.hot_dir), DiskTier(WARM, paths.warm_dir)
        self.tiers = {HOT: self.hot, WARM: self.warm}
        if paths.cold_dir is not None:
            self.tiers[COLD] = DiskTier(COLD, paths.cold_dir)
        self.config = self.config.model_copy(update={"catalog": catalog or CatalogConfig()})
        self.catalog = backends.open_site(self.config)
        self.metrics = GatewayMetrics("test")
        deid = Deidentifier(paths.hot_dir / "deid.key")
        self.flow = Flow(self.config, self.catalog, self.tiers, self.metrics, deid=deid)
        self.ingest = Ingest(self.catalog, self.tiers, self.metrics, paths.min_free_bytes)

    def store_study(self, n: int = 2) -> str:
        study = generate_uid()
        ds = pydicom.dcmread(CT)
        ds.StudyInstanceUID = study
        for _ in range(n):
            ds.SOPInstanceUID = generate_uid()
            outcome = store_bytes(
                self.ingest, _encode(ds), EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X"
            )
            assert outcome.status == StoreStatus.SUCCESS
        return study


def age_study(catalog: Catalog, study_uid: str, seconds: float) -> None:
    """As if the study's last instance came `seconds` earlier (on any SQL backend)."""
    assert isinstance(catalog, SQLCatalog)
    with catalog.db.write() as tx:
        tx.execute(
            "UPDATE studies SET last_received = last_received - ? WHERE study_uid = ?",
            (seconds, study_uid),
        )


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    return raw[144 + int.from_bytes(raw[140:144], "little") :]


@pytest.fixture
def site(tmp_path: Path, catalog_config: CatalogConfig) -> Site:
    return Site(tmp_path, catalog_config)


def files_of(tier: DiskTier, study: str) -> list[PurePosixPath]:
    root = tier.path(study_dir(study))
    return sorted(PurePosixPath(p.relative_to(tier.root)) for p in root.rglob("*.dcm"))


def test_write_is_atomic_and_leaves_no_temporaries(site: Site) -> None:
    relative = PurePosixPath("studies/1.2/1.3/1.4.dcm")

    def broken() -> object:
        yield b"half"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        site.hot.write(relative, broken())  # type: ignore[arg-type]
    assert not site.hot.path(relative).exists()
    assert list(site.hot.path(relative).parent.iterdir()) == []
    assert site.hot.write(relative, (b"a", b"bc")) == 3
    assert site.hot.read(relative) == b"abc"
    (site.hot.path(relative).parent / ".1.4.dcm.abc.tmp").write_bytes(b"crash leftover")
    assert site.hot.sweep_temporaries(time.time() + 1) == 1


def test_the_start_up_sweep_spares_what_may_be_a_peers_store_in_flight(site: Site) -> None:
    study = site.store_study(1)
    (kept,) = files_of(site.hot, study)
    stray = instance_path(study, "1.2.3", "1.2.3.4", 1)
    site.hot.write(stray, [b"renamed, never catalogued"])
    known, grace = site.catalog.catalogued_paths, time.time() - 900
    assert site.hot.sweep_uncatalogued(known, grace) == 0
    os.utime(site.hot.path(stray), (time.time() - 1000,) * 2)
    assert site.hot.sweep_uncatalogued(known, grace) == 1
    assert not site.hot.exists(stray)
    assert site.hot.exists(kept)


def test_the_sweep_grace_period_follows_the_catalog(tmp_path: Path) -> None:
    config = example_config(11112, 8080, tmp_path)
    assert config.sweep_grace_seconds == 0  # SQLite: the site's only gateway
    shared = CatalogConfig(url="postgresql://telerad@db:5432/site")
    assert config.model_copy(update={"catalog": shared}).sweep_grace_seconds == 900
    assert CatalogConfig(secret_dir=tmp_path).shared
    storage = config.storage.model_copy(update={"sweep_grace_seconds": 30})
    both = config.model_copy(update={"catalog": shared, "storage": storage})
    assert both.sweep_grace_seconds == 30


def test_stored_file_is_meta_plus_the_bytes_received(site: Site) -> None:
    study = site.store_study(1)
    (path,) = files_of(site.hot, study)
    stored = site.hot.read(path)
    assert stored.endswith(_encode(pydicom.dcmread(site.hot.path(path))))
    ds = pydicom.dcmread(site.hot.path(path))
    assert ds.StudyInstanceUID == study
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    assert stored[: len(file_meta(CT_CLASS, ds.SOPInstanceUID, EXPLICIT, "X"))] == file_meta(
        CT_CLASS, ds.SOPInstanceUID, EXPLICIT, "X"
    )


def test_a_catalogued_file_lost_in_a_crash_is_put_back_by_the_resend(site: Site) -> None:
    """The rename is made durable after the catalog commit; a power cut in between can
    leave a row whose file is gone. The sender was not answered, sends again, and the
    gateway must store the bytes again rather than call them a duplicate."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    body = _encode(ds)
    assert store_bytes(site.ingest, body, EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X").status == 0
    (stored,) = site.catalog.versions(ds.SOPInstanceUID)
    site.hot.path(PurePosixPath(stored.path)).unlink()
    assert store_bytes(site.ingest, body, EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X").status == 0
    assert site.catalog.versions(ds.SOPInstanceUID) == [stored]
    assert site.hot.read(PurePosixPath(stored.path)).endswith(body)
    assert (
        site.metrics.registry.get_sample_value(
            "telerad_gateway_warnings_total", {"site": "test", "reason": "restored-lost-file"}
        )
        == 1
    )


def test_an_instance_first_catalogued_as_version_2_counts_once(site: Site) -> None:
    """Issue 25 item 6: a file on an instance's version 1 path that no row names (a
    receiver killed between its rename and its commit while the gateway runs on; the
    sweep of such files is at start) makes the re-send's first row version 2. The
    study counted only version 1 rows: 399 instances in QIDO and the worklist, 400 in
    the series. Study, series and routing now count the instance once."""
    study = site.store_study(1)
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
    left = instance_path(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, 1)
    site.hot.write(left, (b"uncatalogued",))
    body = _encode(ds)
    assert store_bytes(site.ingest, body, EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X").status == 0
    assert [v.version for v in site.catalog.versions(ds.SOPInstanceUID)] == [2]
    (series,) = site.catalog.search(Search(Level.SERIES, study_uid=study)).rows
    assert series["NumberOfSeriesRelatedInstances"] == 2
    assert series["NumberOfStudyRelatedInstances"] == 2
    assert site.catalog.summary(study).instances == 2


def test_full_disk_refuses_with_out_of_resources(tmp_path: Path) -> None:
    site = Site(tmp_path, min_free_bytes=1 << 62)
    outcome = store_bytes(site.ingest, BODY, EXPLICIT, CT_CLASS, "1.2.3", "X")
    assert outcome.status == StoreStatus.OUT_OF_RESOURCES
    assert not (site.hot.root / "studies").exists()


def test_lifecycle_moves_then_deletes(site: Site) -> None:
    old, recent = site.store_study(), site.store_study()
    now = time.time()
    assert site.flow.complete_due(now + 60) == 2
    age_study(site.catalog, old, 8 * DAY)  # the old study was last touched 8 days ago
    hot_files = files_of(site.hot, old)
    contents = [site.hot.read(p) for p in hot_files]
    site.flow.lifecycle(now)
    assert files_of(site.hot, old) == []
    assert files_of(site.warm, old) == hot_files
    assert [site.warm.read(p) for p in hot_files] == contents
    assert {v.tier for p in hot_files for v in site.catalog.versions(p.stem)} == {WARM}
    assert len(files_of(site.hot, recent)) == 2

    site.flow.lifecycle(now + 31 * DAY)
    assert files_of(site.warm, old) == []
    assert files_of(site.hot, recent) == []
    assert site.catalog.worklist(10, 0) == []
    assert (
        site.metrics.registry.get_sample_value(
            "telerad_gateway_lifecycle_studies_total", {"site": "test", "action": "deleted"}
        )
        == 2
    )


def late_instance(site: Site, study: str) -> str:
    """Another instance of `study`, as a modality that sends one more days later."""
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, generate_uid()
    assert (
        store_bytes(site.ingest, _encode(ds), EXPLICIT, CT_CLASS, ds.SOPInstanceUID, "X").status
        == 0
    )
    return str(ds.SOPInstanceUID)


def test_a_study_ages_from_hot_to_warm_to_cold_one_tier_a_pass(
    tmp_path: Path, catalog_config: CatalogConfig
) -> None:
    site = Site(
        tmp_path, catalog_config, cold_dir=tmp_path / "cold", warm_days=30, retention_days=90
    )
    cold = site.tiers[COLD]
    study = site.store_study()
    now = time.time()
    site.flow.complete_due(now + 60)
    age_study(site.catalog, study, 40 * DAY)  # due for warm and for cold: one move a pass
    site.flow.lifecycle(now)
    assert len(files_of(site.warm, study)) == 2 and not files_of(site.hot, study)
    # One more instance arrives, to hot, after the study went warm; it completes again.
    late = late_instance(site, study)
    site.flow.complete_due(now + 60)
    age_study(site.catalog, study, 40 * DAY)
    site.flow.lifecycle(now)
    assert isinstance(cold, DiskTier)
    assert len(files_of(cold, study)) == 3, "the late instance goes from hot to cold directly"
    assert not files_of(site.warm, study) and not files_of(site.hot, study)
    assert {v.tier for v in site.catalog.versions(late)} == {COLD}
    site.flow.lifecycle(now + 90 * DAY)
    assert not files_of(cold, study)
    assert site.catalog.worklist(10, 0) == []
    moved = {
        action: site.metrics.registry.get_sample_value(
            "telerad_gateway_lifecycle_studies_total", {"site": "test", "action": action}
        )
        for action in (WARM, COLD, "deleted")
    }
    assert moved == {WARM: 1, COLD: 1, "deleted": 1}


def test_tier_ages_must_increase_and_a_tier_is_one_place() -> None:
    tiers = {"hot_dir": "/h", "warm_dir": "/w", "cold_dir": "/c"}
    StoragePaths.model_validate({**tiers, "hot_days": 7, "warm_days": 30, "retention_days": 30})
    with pytest.raises(ValueError, match="hotDays < warmDays <= retentionDays"):
        StoragePaths.model_validate({**tiers, "hot_days": 7, "warm_days": 7})
    with pytest.raises(ValueError, match="hotDays < warmDays <= retentionDays"):
        StoragePaths.model_validate({**tiers, "warm_days": 60, "retention_days": 30})
    with pytest.raises(ValueError, match="coldDir or coldStore, not both"):
        StoragePaths.model_validate({**tiers, "cold_store": {"url": "s3://bucket/p"}})
    # Without a warm tier a study goes from hot to cold at hotDays; warmDays is unused.
    paths = StoragePaths.model_validate({"hot_dir": "/h", "cold_dir": "/c", "warm_days": 1})
    assert (paths.moves_on(HOT), paths.moves_on(COLD)) == ((COLD, 7), None)


def test_lifecycle_recovers_from_a_pass_cut_short(site: Site) -> None:
    moving, deleting = site.store_study(), site.store_study()
    now = time.time()
    site.flow.complete_due(now + 60)
    # Crash 1: the warm copy was half made (one file) before the catalog switched tiers.
    (first, _) = files_of(site.hot, moving)
    site.warm.write(first, (site.hot.read(first),))
    # Crash 2: a study was marked for deletion, and one of its files already removed.
    site.catalog.mark_deleting(deleting)
    site.hot.path(files_of(site.hot, deleting)[0]).unlink()
    age_study(site.catalog, moving, 8 * DAY)
    site.flow.lifecycle(now)
    assert len(files_of(site.warm, moving)) == 2
    assert files_of(site.hot, moving) == []
    assert files_of(site.hot, deleting) == []
    assert [e.study_uid for e in site.catalog.worklist(10, 0)] == [moving]


def test_receivers_follow_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert default_count(tmp_path) == cpus  # no cgroup file: every CPU we may run on
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert default_count(tmp_path) == cpus
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert default_count(tmp_path) == min(cpus, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert default_count(tmp_path) == 1


def test_an_instance_arriving_while_its_study_moves_to_warm_stays_safe(site: Site) -> None:
    """The lifecycle pass picked the study, then a late instance arrived before the move:
    the move takes only what it listed, and the late instance stays, catalogued, in hot.
    A receiver that had seen the removed directories still stores into the study."""
    study = site.store_study(2)
    now = time.time()
    site.flow.complete_due(now + 60)
    age_study(site.catalog, study, 8 * DAY)
    (picked,) = site.catalog.lifecycle_candidates(HOT, now - 7 * DAY, 10)
    late = pydicom.dcmread(CT)
    late.StudyInstanceUID = study
    late.SOPInstanceUID = generate_uid()
    body = _encode(late)
    assert store_bytes(site.ingest, body, EXPLICIT, CT_CLASS, late.SOPInstanceUID, "X").status == 0
    site.flow._move(picked, WARM)
    (kept,) = site.catalog.versions(late.SOPInstanceUID)
    assert kept.tier == HOT
    assert site.hot.read(PurePosixPath(kept.path)).endswith(body)
    assert len(files_of(site.warm, study)) == 2
    assert files_of(site.hot, study) == [PurePosixPath(kept.path)]

    # The whole study leaves hot: directories go, and a receiver whose cache still holds
    # them stores the next instance all the same.
    site.hot.remove(PurePosixPath(kept.path))
    site.hot.prune(study_dir(study))
    assert not site.hot.path(study_dir(study)).exists()
    other = DiskTier(HOT, site.hot.root)
    other._known_dirs.add(site.hot.path(PurePosixPath(kept.path)).parent)
    again = Ingest(site.catalog, {HOT: other, WARM: site.warm}, site.metrics, 0)
    late.SOPInstanceUID = generate_uid()
    assert (
        store_bytes(again, _encode(late), EXPLICIT, CT_CLASS, late.SOPInstanceUID, "X").status == 0
    )
