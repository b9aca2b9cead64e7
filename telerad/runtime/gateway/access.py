"""Who may use the HTTP API, and the record of what they did.

Tokens are `<namespace>.<random>`: the prefix names the tenant, so a token that belongs to
another tenant is told apart from a wrong one (403 rather than 401) without this gateway
knowing any other tenant's secrets. Either answer comes before any lookup, so neither says
whether a study exists. Tokens are compared by their SHA-256 digests: the lookup is a dict
probe on a digest, which reveals nothing about the secret through timing.

What the audit trail (`telerad.runtime.store.audit`) says of a request names the client
(the key of its token in the Secret, never the token), the route template, and hashed
UIDs; query values are left out because search keys such as PatientName are patient data.
Query key names are the client's text too: at most `MAX_QUERY_KEYS` of them, each cut to
`MAX_KEY_CHARS` and with anything but printable ASCII escaped, so no request can make a
record large or unreadable.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)\.([A-Za-z0-9_-]{32,256})")
RELOAD_AFTER_S = 5.0


class TokenFileError(ValueError):
    """A token file is unusable; the message names the file, never its content."""


def new_token(tenant: str) -> str:
    return f"{tenant}.{secrets.token_urlsafe(32)}"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a request's credentials."""

    status: Literal[200, 401, 403]
    client: str | None = None
    """The token's name in the Secret, when it is one of ours."""
    tenant: str | None = None
    """The tenant the token claims, whether or not it is ours."""


class Tokens:
    """The tenant's client tokens from a mounted Secret, re-read when it changes.

    Kubernetes updates a mounted Secret by swapping a symlink, so an unknown token makes
    the directory be read again (at most every few seconds): a new or rotated token works
    without a restart, and a removed one stops working at the next read.
    """

    def __init__(self, tenant: str, directory: Path | None) -> None:
        self.tenant = tenant
        self.directory = directory
        self._clients: dict[bytes, str] = {}
        self._loaded = 0.0
        self._lock = threading.Lock()
        if directory is not None:
            self._clients = self._read(directory)
            self._loaded = time.monotonic()

    @property
    def configured(self) -> bool:
        return self.directory is not None

    def _read(self, directory: Path) -> dict[bytes, str]:
        clients: dict[bytes, str] = {}
        try:
            entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise TokenFileError(f"cannot read the token directory {directory}: {exc}") from None
        for path in entries:
            if not path.is_file():
                continue
            token = path.read_text(errors="replace").strip()
            match = _TOKEN.fullmatch(token)
            if match is None:
                raise TokenFileError(
                    f"token {path.name!r} in {directory} is not <namespace>.<at least 32"
                    " URL-safe characters>; create one with `telerad token --tenant NS`"
                )
            if match.group(1) != self.tenant:
                raise TokenFileError(
                    f"token {path.name!r} in {directory} belongs to namespace"
                    f" {match.group(1)!r}, not to this site's {self.tenant!r}"
                )
            clients[_digest(token)] = path.name
        if not clients:
            log.warning("no client tokens in %s: the HTTP API refuses every request", directory)
        return clients

    def _reload(self) -> None:
        with self._lock:
            if self.directory is None or time.monotonic() - self._loaded < RELOAD_AFTER_S:
                return
            self._loaded = time.monotonic()
            try:
                self._clients = self._read(self.directory)
            except TokenFileError as exc:
                # A bad edit of the Secret must not lock everyone out: keep the last good set.
                log.error("%s; keeping the tokens read before", exc)

    def check(self, authorization: str | None) -> Verdict:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Verdict(401)
        match = _TOKEN.fullmatch(token)
        if match is None:
            return Verdict(401)
        tenant = match.group(1)
        if tenant != self.tenant:
            return Verdict(403, tenant=tenant)
        digest = _digest(token)
        client = self._clients.get(digest)
        if client is None:
            self._reload()
            client = self._clients.get(digest)
        return Verdict(200, client=client, tenant=tenant) if client else Verdict(401)


MAX_QUERY_KEYS = 32
MAX_KEY_CHARS = 64


def query_keys(names: Iterable[str]) -> dict[str, Any]:
    """What the audit record says of a request's query keys (never their values)."""
    unique = sorted({printable(n, MAX_KEY_CHARS) for n in names})
    shown: dict[str, Any] = {"queryKeys": unique[:MAX_QUERY_KEYS]}
    if len(unique) > MAX_QUERY_KEYS:
        shown["queryKeysOmitted"] = len(unique) - MAX_QUERY_KEYS
    return shown


def printable(text: str, limit: int) -> str:
    """`text` with anything but printable ASCII as a Python escape (`\\n`, `\\x00`,
    `\\u2028`), cut to `limit` characters and then marked with "..."."""
    clean = "".join(c if " " <= c <= "~" and c != "\\" else ascii(c)[1:-1] for c in text[:limit])
    return clean[:limit] + "..." if len(clean) > limit or len(text) > limit else clean
