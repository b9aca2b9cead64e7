"""The one place that names the catalog's backends: `open` takes a URL and gives a
`Catalog` on the backend it names, its schema migrated to this version of telerad."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from telerad.runtime.store.catalog import Catalog
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


def open(url: str, *, site: str, password_file: Path | None = None) -> Catalog:
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
        raise CatalogUnavailable(
            f"{scheme}://: the PostgreSQL catalog is not built yet (issue 17); use sqlite://"
        )
    raise CatalogUnavailable(f"{url!r}: a catalog URL starts with sqlite:// or postgresql://")
