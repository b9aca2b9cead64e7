"""Keeping patient data out of logs: identifiers appear only as short one-way hashes,
enough to follow one study through the logs of several components."""

from __future__ import annotations

import hashlib


def ref(identifier: str) -> str:
    """A stable, non-reversible reference to a UID or other identifier."""
    return hashlib.sha256(identifier.encode()).hexdigest()[:12]
