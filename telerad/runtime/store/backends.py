"""The one place that names the catalog's backends: `open` takes a URL and gives a
`Catalog` on the backend it names, its schema migrated to this version of telerad."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import psycopg_pool

from telerad.api.config import CatalogConfig, GatewayConfig
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.postgres import schema as postgres_schema
from telerad.runtime.store.postgres.database import MIGRATION_LOCK, PostgresDatabase
from telerad.runtime.store.sql.catalog import SQLCatalog
from telerad.runtime.store.sql.migrate import migrate
from telerad.runtime.store.sqlite import schema as sqlite_schema
from telerad.runtime.store.sqlite.database import SQLiteDatabase

CATALOG_FILE = "catalog.sqlite"
"""The embedded catalog's file in the hot tier."""


class CatalogUnavailable(Exception):
    """The catalog's database cannot be used: the URL says what, the message why."""


def default_url(hot_dir: Path) -> str:
    return f"sqlite:///{hot_dir.absolute() / CATALOG_FILE}"


def open_site(config: GatewayConfig) -> Catalog:
    """The catalog a gateway's configuration names."""
    url, password = connection(config.catalog, config.storage.hot_dir)
    return open(url, site=config.site, password=password)


def connection(config: CatalogConfig, hot_dir: Path) -> tuple[str, str | None]:
    """The URL (never with a password) and the password of the configured catalog."""
    url = config.url or default_url(hot_dir)
    password = None
    if config.password_file is not None:
        try:
            password = config.password_file.read_text().strip()
        except OSError as exc:
            raise CatalogUnavailable(f"catalog password file: {exc}") from None
    return url, password


def open(url: str, *, site: str, password: str | None = None) -> Catalog:
    """The catalog at `url` for `site`: `sqlite:///PATH` or `postgresql://...`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = Path(url.removeprefix("sqlite://"))
        if not path.parent.is_dir():
            raise CatalogUnavailable(f"{url}: directory {path.parent} does not exist")
        db = SQLiteDatabase(path)
        migrate(db, sqlite_schema.MIGRATIONS, unversioned=sqlite_schema.unversioned)
        return SQLCatalog(db)
    if scheme in ("postgresql", "postgres"):
        try:
            pg = PostgresDatabase(url, site=site, password=password)
        except psycopg_pool.PoolTimeout as exc:
            raise CatalogUnavailable(f"{_safe(url)}: cannot connect: {exc}") from None
        try:
            migrate(pg, postgres_schema.MIGRATIONS, lock=MIGRATION_LOCK)
            return SQLCatalog(pg)
        except BaseException:
            pg.close()
            raise
    raise CatalogUnavailable(f"{url!r}: a catalog URL starts with sqlite:// or postgresql://")


def _safe(url: str) -> str:
    """The URL as logs may show it: scheme, host, port and database, no user or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 5432}{parts.path}"
