"""A tier in an S3-compatible object store (the S3 adapter of `tier.Tier`), through obstore.

One object per instance version, named `PREFIX/studies/STUDY/SERIES/SOP[.vN].dcm`. A data
set is received into a local staged file (sealed as it arrives when the site encrypts), then
stored by a create-only PUT (`If-None-Match: *`) signed with its SHA-256: the server's 200
plays the part fsync and link play on a disk, so the acknowledgement order stays object
durable -> catalog row committed -> success. A PUT whose answer was lost is retried by
obstore and meets its own object: the write token in the object's metadata tells it from
another writer's (docs/object-storage.md).

Every PUT carries the tier's storage class. In an archive class (`GLACIER`, `DEEP_ARCHIVE`)
a GET is refused (403 `InvalidObjectState`) until the object is restored: reads raise
`tier.Archived`, and `restore` asks for a readable copy with RestoreObject, the one call
obstore lacks, through botocore.
"""

from __future__ import annotations

import errno
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from telerad.api.config import ObjectStore
from telerad.runtime.store.envelope import (
    HEADER,
    TAG,
    Buffer,
    Keyring,
    Opened,
    Rewrap,
    new_slot,
)
from telerad.runtime.store.files import CHUNK, INCOMING, STUDIES, DiskTier, Staged
from telerad.runtime.store.tier import Archived

WRITE_TOKEN = "telerad-write"  # noqa: S105  (a metadata key, not a secret)
"""User metadata (`x-amz-meta-telerad-write`) that says which write stored an object."""
RETRIES = {
    # obstore's defaults (10 retries within 3 minutes) would hold a store that long while
    # the server is down; a refused store is retried by its sender.
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=10),
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
}


class ObjectStoreError(OSError):
    """The object store did not do what was asked (down, refusing, unreachable). An
    OSError, as a failing disk is: callers refuse the store, never acknowledge it. The
    message keeps the client's reason but no object name (they hold UIDs)."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        reason = f"{what}: {_UIDS.sub('UID', str(cause))}" if cause is not None else what
        super().__init__(errno.EIO, reason)


_UIDS = re.compile(r"[0-9]+(?:\.[0-9]+){4,}")
_ARCHIVED = "<Code>InvalidObjectState</Code>"
"""S3's refusal to GET an object of an archive class that is not restored."""

RESTORE_SECONDS = {
    # S3's documented typical restore times, per class and retrieval tier: what
    # `Retry-After` says (a client asking sooner only gets another 202).
    ("GLACIER", "Expedited"): 5 * 60,
    ("GLACIER", "Standard"): 5 * 3600,
    ("GLACIER", "Bulk"): 12 * 3600,
    ("DEEP_ARCHIVE", "Standard"): 12 * 3600,
    ("DEEP_ARCHIVE", "Bulk"): 48 * 3600,
}


def s3_store(config: ObjectStore) -> S3Store:
    """The client for a configured bucket: credentials from its file, else from the
    standard AWS environment (obstore reads it), path-style requests to an endpoint of
    one's own."""
    # The body is not hashed into the signature: its SHA-256 checksum header is, and the
    # server refuses a body that does not match it, so the same bytes are hashed once on
    # each side instead of twice.
    options: dict[str, object] = {
        "region": config.region,
        "checksum_algorithm": "SHA256",
        "unsigned_payload": True,
    }
    if config.endpoint is not None:
        options |= {"endpoint": config.endpoint, "virtual_hosted_style_request": False}
    if found := _credentials(config):
        options |= {
            "access_key_id": found["AWS_ACCESS_KEY_ID"],
            "secret_access_key": found["AWS_SECRET_ACCESS_KEY"],
        }
    client = {
        "allow_http": config.endpoint is not None and config.endpoint.startswith("http://"),
        "connect_timeout": timedelta(seconds=5),
        "timeout": timedelta(seconds=60),
    }
    return S3Store(
        config.bucket,
        prefix=config.prefix or None,
        client_options=client,  # type: ignore[arg-type]
        retry_config=RETRIES,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def _credentials(config: ObjectStore) -> dict[str, str]:
    """The access key pair from the configured file or mounted Secret, else nothing (the
    client's own chain: the AWS environment, the pod's identity)."""
    keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    where = config.credentials_file or config.credentials_dir
    try:
        if config.credentials_file is not None:
            lines = config.credentials_file.read_text().splitlines()
            found = dict(line.strip().partition("=")[::2] for line in lines if "=" in line)
        elif config.credentials_dir is not None:
            files = {key: config.credentials_dir / key for key in keys}
            found = {k: f.read_text().strip() for k, f in files.items() if f.is_file()}
        else:
            return {}
    except OSError as exc:
        raise ObjectStoreError(f"credentials in {where}: {exc.strerror}") from None
    missing = keys - set(found)
    if missing:
        raise ObjectStoreError(f"credentials in {where} lack {', '.join(sorted(missing))}")
    return found


def _restore_client(config: ObjectStore) -> Any:
    """botocore's S3 client for the bucket, with the credentials obstore gets."""
    # Imported here: botocore takes half a second to import, and only a site that restores
    # from an archive class ever needs it.
    import botocore.config  # noqa: PLC0415
    import botocore.session  # noqa: PLC0415

    options: dict[str, Any] = {"region_name": config.region}
    if config.endpoint is not None:
        options["endpoint_url"] = config.endpoint
    if found := _credentials(config):
        options |= {
            "aws_access_key_id": found["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": found["AWS_SECRET_ACCESS_KEY"],
        }
    settings = botocore.config.Config(
        s3={"addressing_style": "path" if config.endpoint is not None else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    return botocore.session.get_session().create_client("s3", config=settings, **options)


class ObjectTier:
    """One tier in a bucket; `staging` is the local directory data sets arrive in."""

    def __init__(
        self, name: str, config: ObjectStore, staging: Path, keyring: Keyring | None = None
    ) -> None:
        self.name = name
        self.keyring = keyring
        self._config = config
        self._store = s3_store(config)
        self._staging = DiskTier(name, staging, keyring)
        self._attributes = {"Storage-Class": config.storage_class} if config.storage_class else {}
        self._what = f"an instance on the {name} tier"
        self._restorer: Any = None  # made at the first restore: most tiers never need one

    # -- storing ----------------------------------------------------------------------
    def receive(self) -> Staged:
        return self._staging.receive()

    def claim(
        self, staged: Staged, names: Iterable[tuple[int, PurePosixPath]]
    ) -> tuple[int, PurePosixPath]:
        staged.complete()
        # One PUT, the whole object in memory: S3 makes a create-only write conditional
        # only in a single request (up to 5 GiB); a multipart upload loses the condition.
        body = staged.path.read_bytes()
        token = secrets.token_hex(12)
        for number, relative in names:
            try:
                self._put(relative, body, {WRITE_TOKEN: token}, create=True)
            except AlreadyExistsError:
                if self._written_by(relative, token):
                    return number, relative  # our own PUT, whose answer was lost
                continue
            return number, relative
        raise ValueError("no free name offered")

    def _put(
        self, relative: PurePosixPath, body: bytes, extra: dict[str, str], *, create: bool
    ) -> None:
        attributes = {**self._attributes, **extra}
        mode = "create" if create else "overwrite"
        try:
            obstore.put(self._store, str(relative), body, mode=mode, attributes=attributes)  # type: ignore[arg-type]
        except AlreadyExistsError:
            raise
        except Exception as exc:
            raise ObjectStoreError(f"the {self.name} tier's store failed a PUT", exc) from exc

    def _written_by(self, relative: PurePosixPath, token: str) -> bool:
        try:
            there = obstore.get(self._store, str(relative), options={"head": True})
        except FileNotFoundError:
            return False  # deleted since: the next name is as good
        except Exception as exc:
            raise ObjectStoreError(f"the {self.name} tier's store failed a HEAD", exc) from exc
        return bool(there.attributes.get(WRITE_TOKEN) == token)

    def settle(self, staged: Staged) -> None:
        staged.discard()  # the PUT's 200 made it durable; the local copy goes

    def write(self, relative: PurePosixPath, chunks: Iterable[bytes]) -> int:
        staged = self._staging.stage(PurePosixPath(INCOMING), chunks)
        try:
            staged.complete()
            self._put(relative, staged.path.read_bytes(), {}, create=False)
            return staged.size
        finally:
            staged.discard()

    # -- reading ----------------------------------------------------------------------
    def _get(self, relative: PurePosixPath, length: int | None = None) -> memoryview:
        """An object's bytes (the first `length` of them), as the client received them:
        a view, not a copy."""
        try:
            if length is not None:
                got = obstore.get_range(self._store, str(relative), start=0, length=length)
                return memoryview(got)
            return memoryview(obstore.get(self._store, str(relative)).bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"no such object on the {self.name} tier") from None
        except Exception as exc:
            if _ARCHIVED in str(exc):
                raise Archived(
                    errno.EAGAIN, f"an object on the {self.name} tier must be restored first"
                ) from None
            raise ObjectStoreError(f"the {self.name} tier's store failed a GET", exc) from exc

    def read(self, relative: PurePosixPath) -> bytes:
        return b"".join(self.chunks(relative))

    def chunks(self, relative: PurePosixPath) -> Iterator[bytes]:
        # One GET, then opened a segment at a time: a ranged GET per segment would be a
        # request per 64 KiB, and each copy of a whole instance costs more than its AES.
        raw = self._get(relative)
        if self.keyring is None:
            for start in range(0, len(raw), CHUNK):
                yield bytes(raw[start : start + CHUNK])
            return
        yield from Opened(Buffer(raw), len(raw), self.keyring, self._what).chunks()

    def exists(self, relative: PurePosixPath) -> bool:
        try:
            obstore.head(self._store, str(relative))
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise ObjectStoreError(f"the {self.name} tier's store failed a HEAD", exc) from exc
        return True

    def check(self, relative: PurePosixPath) -> None:
        # A ranged GET, not a HEAD: S3 answers HEAD for an archived object, GET refuses it.
        if self.keyring is None:
            self._get(relative, 1)
            return
        head = self._get(relative, HEADER)
        Opened(Buffer(head), HEADER + TAG, self.keyring, self._what)

    def restore(self, relative: PurePosixPath) -> int:
        config = self._config
        if self._restorer is None:
            self._restorer = _restore_client(config)
        key = f"{config.prefix}/{relative}" if config.prefix else str(relative)
        request = {
            "Days": config.restore_days,
            "GlacierJobParameters": {"Tier": config.restore_tier},
        }
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            self._restorer.restore_object(Bucket=config.bucket, Key=key, RestoreRequest=request)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "RestoreAlreadyInProgress":
                what = f"the {self.name} tier's store refused a restore"
                raise ObjectStoreError(what, exc) from exc
        except BotoCoreError as exc:
            raise ObjectStoreError(f"the {self.name} tier's store failed a restore", exc) from exc
        return RESTORE_SECONDS.get((config.storage_class or "", config.restore_tier), 60)

    # -- removing ---------------------------------------------------------------------
    def remove(self, relative: PurePosixPath) -> None:
        self._call(obstore.delete, str(relative))

    def remove_tree(self, relative: PurePosixPath) -> None:
        paths = [str(meta["path"]) for page in self._list(relative) for meta in page]
        for start in range(0, len(paths), 1000):  # DeleteObjects takes 1000 at a time
            self._call(obstore.delete, paths[start : start + 1000])

    def prune(self, relative: PurePosixPath) -> None:
        """Nothing to do: a bucket has no directories."""

    def _list(self, relative: PurePosixPath) -> Iterator[list[dict[str, object]]]:
        try:
            yield from obstore.list(self._store, prefix=str(relative))
        except Exception as exc:
            raise ObjectStoreError(f"the {self.name} tier's store failed a LIST", exc) from exc

    def _call(self, operation: Callable[..., object], *args: object) -> None:
        try:
            operation(self._store, *args)
        except Exception as exc:
            what = f"the {self.name} tier's store failed ({operation.__name__})"
            raise ObjectStoreError(what, exc) from exc

    # -- housekeeping -----------------------------------------------------------------
    def free_bytes(self) -> int:
        """Free space where data sets are received: a bucket has no watermark."""
        return shutil.disk_usage(self._staging.root).free

    def sweep_temporaries(self, before: float) -> int:
        return self._staging.sweep_temporaries(before)

    def sweep_uncatalogued(self, catalogued: Callable[[str, str], set[str]], before: float) -> int:
        """Objects no catalog row names, last modified before `before`: a crash between
        the PUT and the commit leaves one; a newer one may be another gateway's store
        between the two."""
        removed = 0
        known: dict[str, set[str]] = {}
        for page in self._list(PurePosixPath(STUDIES)):
            for meta in page:
                path = str(meta["path"])
                parts = path.split("/")
                if len(parts) < 4 or not path.endswith(".dcm"):
                    continue
                study = parts[1]
                if study not in known:
                    known[study] = catalogued(self.name, study)
                written = meta["last_modified"]
                assert isinstance(written, datetime)  # noqa: S101  (obstore's ObjectMeta)
                if path not in known[study] and written.timestamp() < before:
                    self._call(obstore.delete, path)
                    removed += 1
        return removed

    def rewrap(self) -> Iterator[Rewrap]:
        """Wrap every object's data key with the keyring's current key, object by object.
        An object cannot be changed in place: one whose header needs the new slot is read
        and PUT again whole, its image bytes as they were (the same ciphertext), so a crash
        leaves it old or new, never torn, and a rerun skips the finished ones (a ranged
        GET of the header each). Archived objects cannot be read and keep their key."""
        if self.keyring is None:
            raise ValueError(f"the {self.name} tier is not encrypted")
        for page in self._list(PurePosixPath(STUDIES)):
            for meta in page:
                relative = PurePosixPath(str(meta["path"]))
                if relative.suffix != ".dcm":
                    continue
                try:
                    yield self._rewrap(relative, self.keyring)
                except FileNotFoundError:
                    continue  # moved to another tier or deleted meanwhile
                except Archived:
                    yield Rewrap.ARCHIVED

    def _rewrap(self, relative: PurePosixPath, keyring: Keyring) -> Rewrap:
        head = self._get(relative, HEADER)
        change = new_slot(Opened(Buffer(head), HEADER + TAG, keyring, self._what), keyring)
        if change is None:
            return Rewrap.CURRENT
        at, slot = change
        body = bytearray(self._get(relative))
        body[at : at + len(slot)] = slot
        self._put(relative, bytes(body), {}, create=False)
        return Rewrap.DONE
