"""What the S3 tier adapter relies on, checked on the real server of tests/s3.py through
obstore, the client the adapter will use: create-only PUTs, SHA-256 checksums, ranged
reads, listing a prefix, deletes, copies with a storage class, and a clear error while the
server is down. Where obstore cannot say something (a caller's own checksum, a copy with a
storage class), a request signed by the fixture says it, and the test records that obstore
cannot."""

from __future__ import annotations

import base64
import hashlib
import threading
from datetime import timedelta

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, GenericError, NotSupportedError
from obstore.store import S3Store

from tests.conftest import S3Bucket


def store(s3: S3Bucket, **config: object) -> S3Store:
    """What the adapter would build: path style, plain HTTP on loopback, SHA-256 checksums,
    short timeouts and few retries (a test must see an outage as an error, not a hang)."""
    return S3Store(
        s3.name,
        endpoint=s3.endpoint,
        region=s3.region,
        access_key_id=s3.credentials["AWS_ACCESS_KEY_ID"],
        secret_access_key=s3.credentials["AWS_SECRET_ACCESS_KEY"],
        virtual_hosted_style_request=False,
        checksum_algorithm="SHA256",
        client_options={
            "allow_http": True,
            "connect_timeout": timedelta(seconds=2),
            "timeout": timedelta(seconds=10),
        },
        retry_config={
            "max_retries": 2,
            "retry_timeout": timedelta(seconds=5),
            "backoff": {
                "init_backoff": timedelta(milliseconds=50),
                "max_backoff": timedelta(seconds=1),
                "base": 2,
            },
        },
        **config,  # type: ignore[arg-type]
    )


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_a_create_only_put_of_an_existing_key_is_refused(s3: S3Bucket) -> None:
    objects = store(s3)
    first = obstore.put(objects, "site/1.2/1.2.3/1.2.3.4", b"first", mode="create")
    assert first["e_tag"]

    with pytest.raises(AlreadyExistsError):
        obstore.put(objects, "site/1.2/1.2.3/1.2.3.4", b"second", mode="create")
    assert obstore.get(objects, "site/1.2/1.2.3/1.2.3.4").bytes() == b"first"
    # The plain PUT overwrites: the adapter must never use it for an instance version.
    obstore.put(objects, "site/1.2/1.2.3/1.2.3.4", b"second")
    assert obstore.get(objects, "site/1.2/1.2.3/1.2.3.4").bytes() == b"second"


def test_of_racing_create_only_puts_exactly_one_wins(s3: S3Bucket) -> None:
    objects = store(s3)
    outcomes: dict[int, str] = {}

    def create(n: int) -> None:
        try:
            obstore.put(objects, "race", f"writer {n}".encode(), mode="create")
            outcomes[n] = "won"
        except AlreadyExistsError:
            outcomes[n] = "refused"

    writers = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    winners = [n for n, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 8
    assert len(winners) == 1
    assert obstore.get(objects, "race").bytes() == f"writer {winners[0]}".encode()


def test_obstore_sends_a_sha256_checksum_the_server_keeps(s3: S3Bucket) -> None:
    data = b"\x00pixel data\xff" * 1000
    obstore.put(store(s3), "checked", data, mode="create")

    head = s3.server.request(
        "HEAD", f"/{s3.name}/checked", headers={"x-amz-checksum-mode": "ENABLED"}
    )
    assert head.status == 200
    assert head.headers.get("x-amz-checksum-sha256") == sha256_b64(data)


def test_a_put_whose_sha256_checksum_does_not_match_is_refused_and_stores_nothing(
    s3: S3Bucket,
) -> None:
    # obstore computes the checksum from the bytes it sends and takes none from the
    # caller: a checksum computed while the instance was received needs a signed request
    # of our own (or trusting obstore's).
    data = b"what was received"
    wrong = sha256_b64(b"something else")
    put = s3.server.request(
        "PUT",
        f"/{s3.name}/mismatch",
        headers={"x-amz-checksum-sha256": wrong, "if-none-match": "*"},
        body=data,
    )
    assert put.status == 400, put
    assert b"<Code>BadDigest</Code>" in put.body, put.body
    with pytest.raises(FileNotFoundError):
        obstore.head(store(s3), "mismatch")

    right = s3.server.request(
        "PUT",
        f"/{s3.name}/mismatch",
        headers={"x-amz-checksum-sha256": sha256_b64(data), "if-none-match": "*"},
        body=data,
    )
    assert right.status == 200, right
    assert right.headers.get("x-amz-checksum-sha256") == sha256_b64(data)
    assert obstore.get(store(s3), "mismatch").bytes() == data


def test_a_put_whose_signed_payload_hash_does_not_match_is_refused(s3: S3Bucket) -> None:
    # obstore signs the payload's SHA-256 by default (unsigned_payload=False): the server
    # checks the body against it, a second end-to-end check besides the checksum.
    put = s3.server.request(
        "PUT",
        f"/{s3.name}/tampered",
        headers={"x-amz-content-sha256": hashlib.sha256(b"other").hexdigest()},
        body=b"sent",
    )
    assert put.status == 400, put
    assert b"<Code>XAmzContentSHA256Mismatch</Code>" in put.body, put.body
    with pytest.raises(FileNotFoundError):
        obstore.head(store(s3), "tampered")


def test_ranged_reads(s3: S3Bucket) -> None:
    objects = store(s3)
    data = bytes(range(256)) * 64  # 16 KiB
    obstore.put(objects, "frames", data, mode="create")

    assert obstore.get_range(objects, "frames", start=100, end=200) == data[100:200]
    assert obstore.get_range(objects, "frames", start=16000, length=384) == data[16000:]
    assert [
        bytes(r) for r in obstore.get_ranges(objects, "frames", starts=[0, 5000], ends=[10, 5010])
    ] == [
        data[0:10],
        data[5000:5010],
    ]
    tail = obstore.get(objects, "frames", options={"range": {"suffix": 132}})
    assert tail.bytes() == data[-132:]
    assert tail.range == (len(data) - 132, len(data))
    offset = obstore.get(objects, "frames", options={"range": {"offset": 16300}})
    assert offset.bytes() == data[16300:]
    # A range that ends past the end is a short read, no error: the adapter must check
    # what it got against the size it expects.
    assert obstore.get_range(objects, "frames", start=16380, end=17000) == data[16380:]
    # One that starts past the end is the server's 416, as a GenericError.
    with pytest.raises(GenericError, match="416 Range Not Satisfiable"):
        obstore.get_range(objects, "frames", start=len(data) + 10, end=len(data) + 20)


def test_listing_a_prefix(s3: S3Bucket) -> None:
    objects = store(s3)
    keys = ["s/1.2/a/1", "s/1.2/a/2", "s/1.2/b/1", "s/1.20/a/1", "s/1.3/a/1"]
    for key in keys:
        obstore.put(objects, key, key.encode(), mode="create")

    under = sorted(m["path"] for m in obstore.list(objects, prefix="s/1.2").collect())
    # obstore treats the prefix as a path: "s/1.2" lists s/1.2/... and not s/1.20/...
    assert under == ["s/1.2/a/1", "s/1.2/a/2", "s/1.2/b/1"]
    assert {m["size"] for m in obstore.list(objects, prefix="s/1.2").collect()} == {9}

    levels = obstore.list_with_delimiter(objects, prefix="s")
    assert sorted(levels["common_prefixes"]) == ["s/1.2", "s/1.20", "s/1.3"]
    assert levels["objects"] == []


def test_delete(s3: S3Bucket) -> None:
    objects = store(s3)
    obstore.put(objects, "gone", b"x", mode="create")
    obstore.delete(objects, "gone")
    with pytest.raises(FileNotFoundError):
        obstore.get(objects, "gone")
    # Deleting what is not there succeeds (S3's DeleteObject is idempotent): a sweeper
    # and a mover racing on one orphan both succeed.
    obstore.delete(objects, "gone")
    # After a delete the key can be created again.
    obstore.put(objects, "gone", b"y", mode="create")
    assert obstore.get(objects, "gone").bytes() == b"y"


def test_storage_classes_are_accepted_and_ignored(s3: S3Bucket) -> None:
    objects = store(s3)
    obstore.put(objects, "warm", b"w", mode="create", attributes={"Storage-Class": "STANDARD_IA"})
    # obstore's copy takes no attributes: a copy to a colder class is a request of our own.
    copy = s3.server.request(
        "PUT",
        f"/{s3.name}/cold",
        headers={"x-amz-copy-source": f"/{s3.name}/warm", "x-amz-storage-class": "DEEP_ARCHIVE"},
    )
    assert copy.status == 200, copy
    # versitygw answers STANDARD whatever was asked (AWS would name the class, and leave
    # the header out for STANDARD): a test of the classes must look at the requests.
    for key in ("warm", "cold"):
        head = s3.server.request("HEAD", f"/{s3.name}/{key}")
        assert head.headers.get("x-amz-storage-class") == "STANDARD", head
    # Nor is an archive class honoured: the object reads at once, and a restore request
    # is not implemented (a cold tier's 202-then-restored path cannot be run on it).
    assert obstore.get(objects, "cold").bytes() == b"w"
    restore = s3.server.request(
        "POST",
        f"/{s3.name}/cold",
        query={"restore": ""},
        body=b"<RestoreRequest><Days>1</Days></RestoreRequest>",
    )
    assert restore.status == 501
    assert b"<Code>NotImplemented</Code>" in restore.body


def test_obstore_copy_overwrites_and_cannot_copy_only_if_absent(s3: S3Bucket) -> None:
    objects = store(s3)
    obstore.put(objects, "a", b"a", mode="create")
    obstore.put(objects, "b", b"b", mode="create")
    obstore.copy(objects, "a", "b")
    assert obstore.get(objects, "b").bytes() == b"a"
    # Without a copy_if_not_exists setting obstore refuses before sending anything.
    with pytest.raises(NotSupportedError, match="copy-if-not-exists"):
        obstore.copy(objects, "a", "c", overwrite=False)
    with pytest.raises(FileNotFoundError):
        obstore.head(objects, "c")


@pytest.mark.timeout(120)
def test_a_stopped_server_is_a_clear_error_and_the_same_client_recovers(s3: S3Bucket) -> None:
    objects = store(s3)
    obstore.put(objects, "before", b"kept", mode="create")
    s3.server.stop()
    try:
        with pytest.raises(GenericError) as put:
            obstore.put(objects, "during", b"lost?", mode="create")
        with pytest.raises(GenericError) as get:
            obstore.get(objects, "before")
    finally:
        s3.server.start()
    # Refused connections, retried max_retries times: obstore's defaults (10 retries
    # within 3 minutes) would hold a store that long, so the adapter must set both.
    for error in (put.value, get.value):
        assert "Connection refused" in str(error), error
        assert "after 2 retries" in str(error), error
    assert obstore.get(objects, "before").bytes() == b"kept"
    with pytest.raises(FileNotFoundError):
        obstore.head(objects, "during")
    obstore.put(objects, "during", b"now", mode="create")
    assert obstore.get(objects, "during").bytes() == b"now"


def test_objects_are_plain_files_in_the_data_dir(s3: S3Bucket) -> None:
    obstore.put(store(s3), "s/1.2/3", b"at rest", mode="create")
    assert (s3.data_dir / "s/1.2/3").read_bytes() == b"at rest"
