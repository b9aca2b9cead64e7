"""The hot tier in an S3 bucket (versitygw, a real server): the adapter's create-only
claims, a lost answer, another writer's object, and an outage of the server under a
running gateway."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import obstore
import pytest
from pydantic import ValidationError

from telerad import synthetic
from telerad.api.config import ObjectStore
from telerad.runtime.store.envelope import Keyring, add_key
from telerad.runtime.store.objects import WRITE_TOKEN, ObjectStoreError, ObjectTier, s3_store
from tests.conftest import S3Bucket
from tests.s3proxy import S3Proxy

from .conftest import GatewayProcess, object_store, retrieved, send_datasets, stored

NAME = PurePosixPath("studies/1.2/1.2.3/1.2.3.4.dcm")
AGAIN = PurePosixPath("studies/1.2/1.2.3/1.2.3.4.v2.dcm")
UID = "1.2.826.0.1.3680043.10.1471.77"


def tier(s3: S3Bucket, tmp_path: Path, endpoint: str | None = None) -> ObjectTier:
    config = object_store(s3, tmp_path)
    if endpoint is not None:
        config = config.model_copy(update={"endpoint": endpoint})
    add_key(tmp_path / "keys", "k1")
    return ObjectTier("hot", s3_store(config), tmp_path / "staging", Keyring(tmp_path / "keys"))


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
    with pytest.raises(ObjectStoreError, match="lacks AWS_SECRET_ACCESS_KEY"):
        s3_store(config)
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
