"""The hot tier in an S3 bucket (versitygw, a real server): the adapter's create-only
claims, a lost answer, another writer's object, and an outage of the server under a
running gateway."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path, PurePosixPath

import httpx2 as httpx
import obstore
import pytest
import yaml
from pydantic import ValidationError

from telerad import synthetic
from telerad.api.config import GatewayConfig, ObjectStore
from telerad.runtime.store.envelope import HEADER, Keyring, Rewrap, add_key
from telerad.runtime.store.objects import WRITE_TOKEN, ObjectStoreError, ObjectTier, s3_store
from tests.conftest import S3Bucket
from tests.s3proxy import S3Proxy

from .conftest import (
    ANY_TRANSFER,
    TELERAD,
    GatewayFactory,
    GatewayProcess,
    age_studies,
    free_port,
    object_store,
    parts,
    retrieved,
    send_datasets,
    stored,
)

NAME = PurePosixPath("studies/1.2/1.2.3/1.2.3.4.dcm")
AGAIN = PurePosixPath("studies/1.2/1.2.3/1.2.3.4.v2.dcm")
UID = "1.2.826.0.1.3680043.10.1471.77"


def tier(s3: S3Bucket, tmp_path: Path, endpoint: str | None = None) -> ObjectTier:
    config = object_store(s3, tmp_path)
    if endpoint is not None:
        config = config.model_copy(update={"endpoint": endpoint})
    add_key(tmp_path / "keys", "k1")
    return ObjectTier("hot", config, tmp_path / "staging", Keyring(tmp_path / "keys"))


def test_a_claimed_object_is_sealed_in_the_bucket_and_reads_back(
    s3: S3Bucket, tmp_path: Path
) -> None:
    objects = tier(s3, tmp_path)
    data = b"DICM pixel data " * 10_000
    file = objects.receive()
    file.write(data)
    assert objects.claim(file, [(1, NAME)]) == (1, NAME)
    objects.settle(file)
    assert not file.path.exists(), "the local copy goes once the PUT is answered"
    raw = (s3.server.data_dir / s3.name / tmp_path.name / NAME).read_bytes()
    assert b"pixel data" not in raw
    assert objects.read(NAME) == data
    assert b"".join(objects.chunks(NAME)) == data
    assert objects.exists(NAME) and not objects.exists(AGAIN)
    objects.check(NAME)
    with pytest.raises(FileNotFoundError):
        objects.read(AGAIN)


def test_the_sweep_spares_objects_newer_than_its_grace_period(s3: S3Bucket, tmp_path: Path) -> None:
    """An object no row names may be another gateway's, between its PUT and its commit:
    the sweep takes it only once it is older than the grace period."""
    objects = tier(s3, tmp_path)
    for relative in (NAME, AGAIN):
        objects.write(relative, [b"sealed bytes"])
    catalogued = {str(NAME)}
    assert objects.sweep_uncatalogued(lambda _tier, _study: catalogued, time.time() - 900) == 0
    assert objects.exists(AGAIN)
    assert objects.sweep_uncatalogued(lambda _tier, _study: catalogued, time.time() + 5) == 1
    assert objects.exists(NAME) and not objects.exists(AGAIN)


def test_a_name_another_writer_holds_is_skipped_for_the_next(s3: S3Bucket, tmp_path: Path) -> None:
    objects = tier(s3, tmp_path)
    first = objects.receive()
    first.write(b"theirs")
    objects.claim(first, [(1, NAME)])
    second = objects.receive()
    second.write(b"ours")
    assert objects.claim(second, [(1, NAME), (2, AGAIN)]) == (2, AGAIN)
    assert objects.read(NAME) == b"theirs"
    assert objects.read(AGAIN) == b"ours"


def test_a_put_whose_answer_was_lost_is_known_as_ours(
    s3: S3Bucket, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    objects = tier(s3, tmp_path, endpoint=s3_proxy.endpoint)
    file = objects.receive()
    file.write(b"ours")
    s3_proxy.lose_next_answer("PUT")
    # obstore retries and meets the object its first PUT stored: the token says it is ours.
    assert objects.claim(file, [(1, NAME), (2, AGAIN)]) == (1, NAME)
    assert [r.method for r in s3_proxy.requests].count("PUT") == 2
    assert not objects.exists(AGAIN)
    head = obstore.get(s3_store(object_store(s3, tmp_path)), str(NAME), options={"head": True})
    assert WRITE_TOKEN in head.attributes


def test_rewrap_in_a_bucket_moves_each_object_to_the_current_key_and_skips_archived_ones(
    s3: S3Bucket, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    objects = tier(s3, tmp_path, endpoint=s3_proxy.endpoint)
    s3_proxy.archive(restore_seconds=3600)
    names = [PurePosixPath(f"studies/1.2/1.2.3/1.2.3.{i}.dcm") for i in range(3)]
    for i, name in enumerate(names):
        file = objects.receive()
        file.write(b"pixel data %d " % i * 20_000)
        objects.claim(file, [(1, name)])
        objects.settle(file)
    cold_config = object_store(s3, tmp_path).model_copy(
        update={
            "url": f"s3://{s3.name}/{tmp_path.name}-cold",
            "endpoint": s3_proxy.endpoint,
            "storage_class": "DEEP_ARCHIVE",
        }
    )
    cold = ObjectTier("cold", cold_config, tmp_path / "staging", Keyring(tmp_path / "keys"))
    cold.write(names[0], [b"archived pixels"])
    raw = s3.server.data_dir / s3.name / tmp_path.name
    before = {n: (raw / n).read_bytes() for n in names}

    add_key(tmp_path / "keys", "k2")
    assert list(objects.rewrap()) == [Rewrap.DONE] * 3
    assert list(objects.rewrap()) == [Rewrap.CURRENT] * 3, "a rerun finds them done"
    assert list(cold.rewrap()) == [Rewrap.ARCHIVED]
    for name in names:
        after = (raw / name).read_bytes()
        assert after[HEADER:] == before[name][HEADER:], "no image byte is rewritten"
        assert after[:HEADER] != before[name][:HEADER]
    # The old key can go: every object opens with the new one alone.
    only_new = tmp_path / "only-new"
    only_new.mkdir()
    for key in ("k2", "current"):
        (only_new / key).write_bytes((tmp_path / "keys" / key).read_bytes())
    fresh = ObjectTier("hot", object_store(s3, tmp_path), tmp_path / "staging", Keyring(only_new))
    assert [fresh.read(n) for n in names] == [b"pixel data %d " % i * 20_000 for i in range(3)]


def test_a_server_that_is_down_is_an_error_that_names_no_uid(s3: S3Bucket, tmp_path: Path) -> None:
    objects = tier(s3, tmp_path)
    file = objects.receive()
    file.write(b"data")
    s3.server.stop()
    try:
        with pytest.raises(ObjectStoreError) as raised:
            objects.claim(file, [(1, PurePosixPath(f"studies/{UID}/{UID}.1/{UID}.1.1.dcm"))])
    finally:
        s3.server.start()
    assert UID not in str(raised.value)
    assert "failed a PUT" in str(raised.value)


def test_a_credentials_file_without_the_keys_is_refused_by_name(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text("AWS_ACCESS_KEY_ID=x\n")
    config = ObjectStore(url="s3://bucket/p", credentials_file=credentials)
    with pytest.raises(ObjectStoreError, match="lack AWS_SECRET_ACCESS_KEY"):
        s3_store(config)
    secret = tmp_path / "secret"  # as the operator mounts a Secret: a file per key
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("x")
    with pytest.raises(ObjectStoreError, match="lack AWS_SECRET_ACCESS_KEY"):
        s3_store(ObjectStore(url="s3://bucket/p", credentials_dir=secret))
    with pytest.raises(ValidationError):
        ObjectStore(url="s3://Not_A_Bucket")


OUTAGE_S = 10


@pytest.mark.reliability("fault", "the S3 server of the hot tier stopped for 10 s")
@pytest.mark.parametrize("hot_tier", ["s3"])
def test_stores_fail_cleanly_while_the_bucket_is_down_and_the_gateway_recovers(
    gateway: GatewayProcess, s3: S3Bucket
) -> None:
    series = list(synthetic.ct_series(n_slices=9, size=32, seed=41))
    assert send_datasets(gateway, series[:3]) == [0, 0, 0]
    s3.server.stop()
    down_at = time.monotonic()
    try:
        refused = send_datasets(gateway, series[3:6])
        assert 0 not in refused, "a store answered success while the bucket was down"
        assert all(s == 0xA700 for s in refused), [hex(s) for s in refused]
        assert gateway.get("/studies")  # QIDO answers: the catalog is not the bucket
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    finally:
        s3.server.start()
    assert gateway.proc is not None and gateway.proc.poll() is None
    assert send_datasets(gateway, series[3:]) == [0] * 6
    kept = {v.sop_uid for v in stored(gateway)}
    assert kept == {str(ds.SOPInstanceUID) for ds in series}
    for ds in series:
        uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        assert retrieved(gateway, *uids)
    assert "failed a PUT" in gateway.log.read_text()


@pytest.mark.parametrize("hot_tier", ["s3"])
@pytest.mark.timeout(240)
def test_a_study_ages_hot_warm_cold_with_its_classes_and_is_restored_for_wado(
    start_gateway: GatewayFactory, s3: S3Bucket, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    """Hot -> warm (STANDARD_IA) -> cold (DEEP_ARCHIVE) in one bucket; versitygw ignores
    classes, so they are checked on the PUTs, and the archive's refusals and restores are
    played by the proxy's stand-in (tests/s3proxy.py). A cold study's QIDO answers at once;
    its WADO-RS answers 202 with Retry-After and starts the restore, then the data."""
    s3_proxy.archive(restore_seconds=3)
    secret = tmp_path / "secret"  # warm and cold take their keys as a mounted Secret
    secret.mkdir()
    for key, value in s3.credentials.items():
        (secret / key).write_text(value)
    base = object_store(s3, tmp_path).model_copy(
        update={"endpoint": s3_proxy.endpoint, "credentials_file": None, "credentials_dir": secret}
    )

    def place(name: str, storage_class: str, **more: str) -> ObjectStore:
        url = f"s3://{s3.name}/{tmp_path.name}-{name}"
        return base.model_copy(update={"url": url, "storage_class": storage_class, **more})

    gateway = start_gateway(
        storage={
            "warm_dir": None,
            "warm_store": place("warm", "STANDARD_IA"),
            "cold_store": place("cold", "DEEP_ARCHIVE", restore_tier="Bulk"),
            "warm_days": 30,
            "retention_days": 90,
            "lifecycle_interval_seconds": 1,
        }
    )
    series = list(synthetic.ct_series(n_slices=4, size=32, seed=43))
    assert send_datasets(gateway, series) == [0] * 4
    study = str(series[0].StudyInstanceUID)
    gateway.wait_for(lambda: gateway.metric("telerad_gateway_studies_completed_total") == 1)
    uids = [(study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)) for ds in series]
    received = [retrieved(gateway, *u) for u in uids]
    for days, tier in ((8, "warm"), (30, "cold")):
        gateway.stop()
        age_studies(gateway, days * 86400)
        gateway.start()
        gateway.wait_for(lambda tier=tier: {v.tier for v in stored(gateway)} == {tier})
    assert gateway.objects() == [], "nothing is left on the hot tier"
    puts = {
        name: {
            r.headers.get("x-amz-storage-class")
            for r in s3_proxy.sent("PUT")
            if f"-{name}/" in r.path
        }
        for name in ("warm", "cold")
    }
    assert puts == {"warm": {"STANDARD_IA"}, "cold": {"DEEP_ARCHIVE"}}

    assert [s["0020000D"]["Value"] for s in gateway.get("/studies")] == [[study]]
    url = f"{gateway.url}/studies/{study}"
    first = httpx.get(url, headers={**gateway.auth, "Accept": ANY_TRANSFER}, timeout=30)
    assert first.status_code == 202, first.text
    assert int(first.headers["Retry-After"]) == 48 * 3600  # Bulk from DEEP_ARCHIVE
    restores = [r for r in s3_proxy.sent("POST") if r.path.endswith("?restore")]
    assert len(restores) == 4
    again = httpx.get(f"{url}/metadata", headers=gateway.auth, timeout=30)
    assert again.status_code == 202, "a restore under way: ask again later"
    deadline = time.monotonic() + 30
    while (
        answer := httpx.get(url, headers={**gateway.auth, "Accept": ANY_TRANSFER}, timeout=30)
    ).status_code == 202:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    assert len(parts(answer)) == 4
    assert [retrieved(gateway, *u) for u in uids] == received, "byte-identical after 2 moves"


def test_the_example_config_keeps_each_tier_given_a_url_in_its_bucket(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interface others rely on: `--example-config` with `--hot-url` (and the warm and
    cold ones) and `--s3-endpoint` prints a config whose tiers are those buckets; the
    gateway it starts takes its credentials from the standard AWS environment."""
    data = tmp_path / "data"
    url = f"s3://{s3.name}/{tmp_path.name}"
    printed = subprocess.run(
        [
            *(str(TELERAD), "gateway", "--example-config", "--data-dir", str(data)),
            *("--port", str(free_port()), "--http-port", str(free_port())),
            *("--hot-url", f"{url}/hot", "--warm-url", f"{url}/warm", "--cold-url", f"{url}/cold"),
            *("--s3-endpoint", s3.endpoint, "--s3-region", s3.region),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config = GatewayConfig.model_validate(yaml.safe_load(printed.stdout))
    hot, warm, cold = (config.storage.place(t)[1] for t in ("hot", "warm", "cold"))
    assert hot is not None and warm is not None and cold is not None
    assert (hot.url, warm.url, cold.url) == (f"{url}/hot", f"{url}/warm", f"{url}/cold")
    assert (hot.storage_class, warm.storage_class, cold.storage_class) == (
        None,
        "STANDARD_IA",
        "GLACIER_IR",
    )
    assert config.storage.warm_dir is None and config.storage.encryption is not None
    assert f"encrypted at rest with the keys in {data / 'keys'}" in printed.stderr

    for key, value in s3.credentials.items():
        monkeypatch.setenv(key, value)
    gateway = GatewayProcess(config, tmp_path)
    gateway.start()
    try:
        ct = list(synthetic.ct_series(n_slices=3, size=32, seed=1811))
        assert send_datasets(gateway, ct) == [0] * 3
        assert len(gateway.objects()) == 3
        assert not list(config.storage.hot_dir.rglob("*.dcm")), "instances left on the volume"
        ds = ct[0]
        kept = retrieved(gateway, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert ds.PixelData in kept
    finally:
        gateway.stop()
