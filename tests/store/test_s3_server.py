"""What the S3 tier adapter relies on, checked on the real server of tests/s3.py through
obstore, the client the adapter will use: create-only PUTs, SHA-256 checksums, ranged
reads, listing a prefix, deletes, copies with a storage class, and a clear error while the
server is down. Where obstore cannot say something (a caller's own checksum, a copy with a
storage class), a request signed by the fixture says it, and the test records that obstore
cannot."""

from __future__ import annotations

import base64
import hashlib
import signal
import threading
import time
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, GenericError, NotSupportedError
from obstore.store import S3Store

from telerad.api.config import ObjectStore
from telerad.runtime.store.objects import RETRIES, s3_store
from tests.conftest import S3Bucket
from tests.processes import alive, signal_inner_pytest
from tests.s3 import Response
from tests.s3proxy import S3Proxy


def store(s3: S3Bucket, endpoint: str | None = None) -> S3Store:
    """The client the S3 tier builds (`objects.s3_store`): path style, plain HTTP on
    loopback, SHA-256 checksums, short timeouts and few retries (an outage is an error,
    not a hang)."""
    config = ObjectStore(url=f"s3://{s3.name}", endpoint=endpoint or s3.endpoint, region=s3.region)
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3.credentials.items():
            env.setenv(key, value)
        return s3_store(config)


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


def test_obstore_asks_for_create_only_a_checksum_and_a_class(
    s3: S3Bucket, s3_proxy: S3Proxy
) -> None:
    objects = store(s3, s3_proxy.endpoint)
    data = b"instance"
    obstore.put(objects, "a", data, mode="create", attributes={"Storage-Class": "GLACIER_IR"})
    (put,) = s3_proxy.sent("PUT")
    assert put.path == f"/{s3.name}/a"
    assert put.headers["if-none-match"] == "*"
    assert put.headers["x-amz-checksum-sha256"] == sha256_b64(data)
    assert put.headers["x-amz-storage-class"] == "GLACIER_IR"
    # The body is not hashed into the signature (unsigned_payload): the checksum header
    # is signed, and the server checks the body against it (the next test).
    assert put.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    signed = put.headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"if-none-match", "x-amz-checksum-sha256", "x-amz-storage-class"} <= set(signed)

    # obstore's copy names neither a class nor a condition: a lifecycle move to a colder
    # class needs a CopyObject of the adapter's own (or a GET and a create-only PUT).
    obstore.copy(objects, "a", "b")
    copy = s3_proxy.sent("PUT")[1]
    assert copy.headers["x-amz-copy-source"] == f"{s3.name}/a"
    assert not {"x-amz-storage-class", "if-none-match"} & set(copy.headers)


def test_a_body_that_does_not_match_its_signed_checksum_is_refused(s3: S3Bucket) -> None:
    """What an unsigned payload relies on: a body altered on its way fails the checksum
    the signature covers, and nothing is stored."""

    def put(name: str, body: bytes) -> Response:
        checksum = sha256_b64(b"what was sent")
        headers = {"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-checksum-sha256": checksum}
        return s3.server.request("PUT", f"/{s3.name}/{name}", headers=headers, body=body)

    altered = put("altered", b"what arrived")
    assert altered.status == 400
    assert b"<Code>BadDigest</Code>" in altered.body
    assert s3.server.request("GET", f"/{s3.name}/altered").status == 404
    assert put("intact", b"what was sent").status == 200


def test_a_large_create_only_put_is_one_request_not_a_multipart_upload(
    s3: S3Bucket, s3_proxy: S3Proxy
) -> None:
    # Past obstore's 5 MiB chunk size a plain put goes multipart, in parts none of which
    # is conditional; a create-only one is a single PUT, the whole object in memory (S3
    # takes at most 5 GiB in one PUT).
    objects = store(s3, s3_proxy.endpoint)
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB
    mib = 1 << 20
    chunks = (data[i : i + mib] for i in range(0, len(data), mib))
    obstore.put(objects, "large", chunks, mode="create")
    assert [(r.method, r.path) for r in s3_proxy.requests] == [("PUT", f"/{s3.name}/large")]
    assert s3_proxy.requests[0].headers["x-amz-checksum-sha256"] == sha256_b64(data)
    assert obstore.get(objects, "large").bytes() == data

    obstore.put(objects, "plain", [data])
    posts = [r.path for r in s3_proxy.sent("POST")]
    assert posts[0] == f"/{s3.name}/plain?uploads="
    assert posts[-1].startswith(f"/{s3.name}/plain?uploadId=")
    parts = [r for r in s3_proxy.sent("PUT") if "partNumber=" in r.path]
    assert len(parts) == 3
    assert not any("if-none-match" in r.headers for r in parts)


def test_a_create_only_put_whose_answer_is_lost_comes_back_as_already_exists(
    s3: S3Bucket, s3_proxy: S3Proxy
) -> None:
    # The server stores the object, the connection drops before the 200 reaches the
    # client, obstore retries the PUT, and the retry meets the object it wrote itself. The
    # adapter can tell this from a real clash by a token of its own in the object's user
    # metadata (x-amz-meta-*), which one HEAD reads back.
    objects = store(s3, s3_proxy.endpoint)
    s3_proxy.lose_next_answer("PUT")
    with pytest.raises(AlreadyExistsError, match="after 1 retries"):
        obstore.put(objects, "k", b"ours", mode="create", attributes={"telerad-write": "w1"})
    assert [r.path for r in s3_proxy.sent("PUT")] == [f"/{s3.name}/k"] * 2
    assert s3_proxy.sent("PUT")[0].headers["x-amz-meta-telerad-write"] == "w1"

    with pytest.raises(AlreadyExistsError):
        obstore.put(objects, "k", b"theirs", mode="create", attributes={"telerad-write": "w2"})
    there = obstore.get(objects, "k", options={"head": True})
    assert s3_proxy.requests[-1].method == "HEAD"
    assert there.attributes["telerad-write"] == "w1"
    assert there.meta["size"] == len(b"ours")
    assert obstore.get(objects, "k").bytes() == b"ours"


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
    entries = obstore.list(objects, prefix="s/1.2").collect()
    assert {m["size"] for m in entries} == {9}
    assert all(m["last_modified"].tzinfo is not None for m in entries)

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
    # and a mover racing on one orphan both succeed. So does a batch naming it.
    obstore.delete(objects, "gone")
    obstore.put(objects, "other", b"o", mode="create")
    obstore.delete(objects, ["gone", "other"])
    with pytest.raises(FileNotFoundError):
        obstore.head(objects, "other")
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
    # Any name is taken, and server-side encryption is accepted and not reported back.
    obstore.put(objects, "odd", b"o", mode="create", attributes={"Storage-Class": "BOGUS"})
    sse = s3.server.request(
        "PUT", f"/{s3.name}/sse", headers={"x-amz-server-side-encryption": "AES256"}, body=b"s"
    )
    assert sse.status == 200, sse
    for key in ("odd", "sse"):
        head = s3.server.request("HEAD", f"/{s3.name}/{key}")
        assert head.headers.get("x-amz-storage-class") == "STANDARD", head
        assert "x-amz-server-side-encryption" not in head.headers, head


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
    # within 3 minutes) would hold a store that long, so the adapter sets both.
    for error in (put.value, get.value):
        assert "Connection refused" in str(error), error
        assert f"after {RETRIES['max_retries']} retries" in str(error), error
    assert obstore.get(objects, "before").bytes() == b"kept"
    with pytest.raises(FileNotFoundError):
        obstore.head(objects, "during")
    obstore.put(objects, "during", b"now", mode="create")
    assert obstore.get(objects, "during").bytes() == b"now"


def test_objects_are_plain_files_in_the_data_dir(s3: S3Bucket) -> None:
    obstore.put(store(s3), "s/1.2/3", b"at rest", mode="create")
    assert (s3.data_dir / "s/1.2/3").read_bytes() == b"at rest"


def test_a_killed_server_keeps_what_it_acknowledged(s3: S3Bucket) -> None:
    objects = store(s3)
    obstore.put(objects, "acked", b"kept", mode="create")
    pid = s3.server.pid
    s3.server.kill()
    assert not alive(pid)
    s3.server.start()
    assert obstore.get(objects, "acked").bytes() == b"kept"


HOLDER = """
import os
from pathlib import Path
import time

from tests.conftest import s3_server  # noqa: F401


def test_hold(s3_server):
    held = Path(os.environ["HELD"])
    held.with_suffix(".tmp").write_text(str(s3_server.pid))
    held.with_suffix(".tmp").replace(held)  # whole when it appears
    time.sleep(600)
"""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_the_server_does_not_outlive_pytest(tmp_path: Path, how: signal.Signals) -> None:
    pid = int(signal_inner_pytest(tmp_path, HOLDER, how))

    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, f"versitygw {pid} outlived pytest"
        time.sleep(0.05)
