"""The one place that names the tiers' backends: a directory, or a bucket in an object
store, each sealing what it stores when the site encrypts at rest (one keyring for all)."""

from __future__ import annotations

from telerad.api.config import StoragePaths
from telerad.runtime.store.catalog import HOT, WARM
from telerad.runtime.store.envelope import Keyring
from telerad.runtime.store.files import DiskTier
from telerad.runtime.store.objects import ObjectTier, s3_store
from telerad.runtime.store.tier import Tier


def open_tiers(storage: StoragePaths) -> dict[str, Tier]:
    """The site's tiers as its configuration names them."""
    encryption = storage.encryption
    keyring = Keyring(encryption.key_dir) if encryption is not None else None
    hot: Tier
    if storage.hot_store is not None:
        store = s3_store(storage.hot_store)
        hot = ObjectTier(HOT, store, storage.hot_dir, keyring, storage.hot_store.storage_class)
    else:
        hot = DiskTier(HOT, storage.hot_dir, keyring)
    found: dict[str, Tier] = {HOT: hot}
    if storage.warm_dir is not None:
        found[WARM] = DiskTier(WARM, storage.warm_dir, keyring)
    return found
