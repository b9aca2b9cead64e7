"""The one place that names the catalog's backends: `open` takes a URL and gives a
`Catalog` on the backend it names, its schema migrated to this version of telerad;
`open_audit` gives the audit trail that goes with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg_pool

from telerad.api.config import CatalogConfig, GatewayConfig
from telerad.runtime.store.audit import AuditTrail
from telerad.runtime.store.audit_files import AuditFiles
from telerad.runtime.store.catalog import Catalog, CatalogUnavailable
from telerad.runtime.store.postgres import schema as postgres_schema
from telerad.runtime.store.postgres.audit import AuditTable
from telerad.runtime.store.postgres.database import MIGRATION_LOCK, PostgresDatabase
from telerad.runtime.store.sql.catalog import SQLCatalog
from telerad.runtime.store.sql.database import Database
from telerad.runtime.store.sql.migrate import Migration, migrate
from telerad.runtime.store.sqlite import schema as sqlite_schema
from telerad.runtime.store.sqlite.database import SQLiteDatabase

CATALOG_FILE = "catalog.sqlite"
"""The embedded catalog's file in the hot tier."""
AUDIT_DIR = "audit"
"""The embedded audit trail's directory in the hot tier."""


def default_url(hot_dir: Path) -> str:
    return f"sqlite:///{hot_dir.absolute() / CATALOG_FILE}"


def open_site(config: GatewayConfig) -> Catalog:
    """The catalog a gateway's configuration names."""
    url, password = connection(config.catalog, config.storage.hot_dir)
    return open(url, site=config.site, password=password)


def open_audit(config: GatewayConfig, catalog: Catalog) -> AuditTrail:
    """The site's audit trail, beside `catalog` (the site's, from `open_site`): its
    append-only `audit` table on PostgreSQL, where every gateway of the site writes and
    other sites see nothing; day files under the hot tier (or `auditDir`) otherwise."""
    if isinstance(catalog, SQLCatalog) and isinstance(catalog.db, PostgresDatabase):
        return AuditTable(catalog.db)
    return AuditFiles(config.audit_dir or config.storage.hot_dir / AUDIT_DIR)


def connection(config: CatalogConfig, hot_dir: Path) -> tuple[str, str | None]:
    """The URL (never with a password) and the password of the configured catalog."""
    if config.secret_dir is not None:
        return _from_secret(config.secret_dir)
    url = config.url or default_url(hot_dir)
    password = None
    if config.password_file is not None:
        password = _read(config.password_file, "catalog password file")
    return url, password


def _from_secret(secret_dir: Path) -> tuple[str, str | None]:
    """The catalog of a mounted Secret as CloudNativePG's `<cluster>-app` has it: `uri`
    when present (its password moved out of the URL), else host, port, dbname and user,
    with the `password` key. `sslmode` and `ca.crt` keys add TLS to either."""

    def key(name: str) -> str | None:
        path = secret_dir / name
        return _read(path, f"catalog Secret key {name!r}") if path.exists() else None

    def required(name: str, called: str | None = None) -> str:
        value = key(name)
        if not value:
            raise CatalogUnavailable(
                f"catalog Secret in {secret_dir} has neither 'uri' nor {called or name!r}"
            )
        return value

    if not secret_dir.is_dir():
        raise CatalogUnavailable(f"catalog Secret directory {secret_dir} does not exist")
    password = key("password")
    uri = key("uri")
    if uri is not None:
        parts = urlsplit(uri)
        if parts.scheme not in ("postgresql", "postgres"):
            raise CatalogUnavailable("catalog Secret key 'uri': not a postgresql:// URL")
        query = parse_qs(parts.query)
        given = query.pop("password", None)
        if given:
            password = given[0]
        elif parts.password is not None:
            password = unquote(parts.password)
        user = quote(unquote(parts.username), safe="") + "@" if parts.username else ""
        netloc = user + parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    else:
        host, dbname = required("host"), required("dbname")
        # CloudNativePG's `<cluster>-app` Secret has both; a hand-made one either.
        user = key("user") or required("username", "user")
        port = key("port") or "5432"
        if not port.isdigit():
            raise CatalogUnavailable(f"catalog Secret key 'port' is not a port number: {port!r}")
        netloc = f"{quote(user, safe='')}@{_bracketed(host)}:{port}"
        base = urlunsplit(("postgresql", netloc, "/" + quote(dbname, safe=""), "", ""))
        query = {}
    sslmode = key("sslmode")
    if sslmode is not None:
        query["sslmode"] = [sslmode]
    if (secret_dir / "ca.crt").exists():
        query.setdefault("sslrootcert", [str(secret_dir / "ca.crt")])
        query.setdefault("sslmode", ["verify-full"])
    url = base + ("?" + urlencode(query, doseq=True, safe="/") if query else "")
    return url, password


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CatalogUnavailable(f"{what}: {exc}") from None


def open(url: str, *, site: str, password: str | None = None) -> Catalog:
    """The catalog at `url` for `site`: `sqlite:///PATH` or `postgresql://...`, its schema
    migrated (CatalogUnavailable, with nothing changed, when that cannot be done)."""
    db, migrations, options = _database(url, site, password)
    try:
        migrate(db, migrations, **options)
        return SQLCatalog(db)
    except BaseException:
        db.close()
        raise


def _database(
    url: str, site: str, password: str | None
) -> tuple[Database, Sequence[Migration], dict[str, Any]]:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = Path(url.removeprefix("sqlite://"))
        if not path.parent.is_dir():
            raise CatalogUnavailable(f"{url}: directory {path.parent} does not exist")
        db = SQLiteDatabase(path)
        return db, sqlite_schema.MIGRATIONS, {"unversioned": sqlite_schema.unversioned}
    if scheme in ("postgresql", "postgres"):
        try:
            pg = PostgresDatabase(url, site=site, password=password)
        except psycopg_pool.PoolTimeout as exc:
            raise CatalogUnavailable(f"{_safe(url)}: cannot connect: {exc}") from None
        return pg, postgres_schema.MIGRATIONS, {"lock": MIGRATION_LOCK}
    raise CatalogUnavailable(f"{url!r}: a catalog URL starts with sqlite:// or postgresql://")


def _safe(url: str) -> str:
    """The URL as logs may show it: scheme, host, port and database, no user or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 5432}{parts.path}"
