"""The one place that names the tiers' backends: a directory, or a location in an object
store, each sealing what it stores when the site encrypts at rest (one keyring for all)."""

from __future__ import annotations

from telerad.api.config import TIERS, StoragePaths
from telerad.runtime.store.envelope import Keyring
from telerad.runtime.store.files import DiskTier
from telerad.runtime.store.objects import ObjectTier
from telerad.runtime.store.tier import Tier


def open_tiers(storage: StoragePaths) -> dict[str, Tier]:
    """The site's tiers as its configuration names them, in the order studies pass
    through them (hot first)."""
    encryption = storage.encryption
    keyring = Keyring(encryption.key_dir) if encryption is not None else None
    found: dict[str, Tier] = {}
    for name in TIERS:
        directory, store = storage.place(name)
        if store is not None:
            # Data sets are received, and copies between tiers staged, in the hot directory.
            found[name] = ObjectTier(name, store, storage.hot_dir, keyring)
        elif directory is not None:
            found[name] = DiskTier(name, directory, keyring)
    return found
