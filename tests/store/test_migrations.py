"""The catalog's schema versions, on each backend: a database at an older version is
brought forward with what it holds, one from before versions were recorded is adopted,
and one written by a newer telerad is refused, unchanged, with a clear error."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import psycopg
import pytest

from telerad.api.config import CatalogConfig
from telerad.runtime.gateway.example import example_config
from telerad.runtime.store import backends
from telerad.runtime.store.catalog import DeliveryKind, SchemaError
from telerad.runtime.store.postgres import schema as postgres_schema
from telerad.runtime.store.postgres.database import MIGRATION_LOCK, PostgresDatabase
from telerad.runtime.store.sql.database import Database
from telerad.runtime.store.sql.migrate import migrate
from telerad.runtime.store.sqlite import schema as sqlite_schema
from telerad.runtime.store.sqlite.database import SQLiteDatabase
from tests.postgres import PostgresServer

SITE = "example"


def raw(catalog: CatalogConfig, tmp_path: Path) -> tuple[Database, list[tuple[str, ...]]]:
    """The backend's database without the catalog on it, and its migrations."""
    url, password = backends.connection(catalog, tmp_path)
    if url.startswith("sqlite"):
        return SQLiteDatabase(Path(url.removeprefix("sqlite://"))), sqlite_schema.MIGRATIONS
    return PostgresDatabase(url, site=SITE, password=password), postgres_schema.MIGRATIONS


def versions(db: Database) -> list[int]:
    with db.read() as tx:
        return [r[0] for r in tx.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def test_an_older_schema_is_brought_forward_with_its_rows(
    catalog_config: CatalogConfig, tmp_path: Path
) -> None:
    db, migrations = raw(catalog_config, tmp_path)
    lock = None if isinstance(db, SQLiteDatabase) else MIGRATION_LOCK
    assert migrate(db, migrations[:1], lock=lock) == 1
    with db.write() as tx:
        tx.execute(
            "INSERT INTO outbox (kind, target, key, job_id, study_uid, payload, next_attempt,"
            " created_at) VALUES ('alert', 'ward', 'k-1', 1, '1.2.3', '{}', 0, 0)"
        )
    db.close()
    url, password = backends.connection(catalog_config, tmp_path)
    catalog = backends.open(url, site=SITE, password=password)
    try:
        leases = {DeliveryKind.ALERT: 60.0, DeliveryKind.EXPORT: 60.0}
        (kept,) = catalog.claim_deliveries("sender", 1.0, 10, leases)
        assert kept.key == "k-1"
    finally:
        catalog.close()
    db, _ = raw(catalog_config, tmp_path)
    assert versions(db) == list(range(1, len(migrations) + 1))
    db.close()


def test_a_schema_from_a_newer_telerad_is_refused_unchanged(
    catalog_config: CatalogConfig, tmp_path: Path
) -> None:
    db, migrations = raw(catalog_config, tmp_path)
    lock = None if isinstance(db, SQLiteDatabase) else MIGRATION_LOCK
    migrate(db, migrations, lock=lock)
    newer = len(migrations) + 1
    with db.write() as tx:
        tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)", (newer,))
    url, password = backends.connection(catalog_config, tmp_path)
    with pytest.raises(SchemaError, match=f"version {newer}, written by a newer telerad"):
        backends.open(url, site=SITE, password=password)
    assert versions(db)[-1] == newer
    db.close()


def test_a_sqlite_catalog_from_before_versions_is_adopted(tmp_path: Path) -> None:
    """As the first releases wrote it: no schema_migrations, and instances without the
    columns added later."""
    path = tmp_path / backends.CATALOG_FILE
    with sqlite3.connect(path) as db:
        for statement in sqlite_schema.MIGRATIONS[0]:
            db.execute(statement.replace("result_of INTEGER, ", ""))
        db.execute("INSERT INTO meta (key, value) VALUES ('instance', 'a1b2')")
    catalog = backends.open(backends.default_url(tmp_path), site=SITE)
    try:
        assert catalog.stored() == []
        assert getattr(catalog, "instance_id", None) == "a1b2"
    finally:
        catalog.close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
        assert "result_of" in columns
        assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == [1, 2]


def test_a_postgresql_catalog_at_version_2_gains_the_append_only_audit_table(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """As the releases before the audit table left it: at version 2, with rows."""
    created = postgres.create_database(f"m{secrets.token_hex(6)}")
    config = CatalogConfig(url=created.url, password_file=created.password_file)
    db, migrations = raw(config, tmp_path)
    assert migrate(db, migrations[:2], lock=MIGRATION_LOCK) == 2
    with db.write() as tx:
        tx.execute(
            "INSERT INTO outbox (kind, target, key, job_id, study_uid, payload, next_attempt,"
            " created_at, lease_owner) VALUES ('alert', 'ward', 'k-2', 1, '1.2.3', '{}', 0, 0,"
            " NULL)"
        )
        assert tx.execute("SELECT to_regclass('audit')").fetchone() == (None,)
    db.close()

    gateway = example_config(11112, 8080, tmp_path, config)
    catalog = backends.open_site(gateway)
    audit = backends.open_audit(gateway, catalog)
    try:
        leases = {DeliveryKind.ALERT: 60.0, DeliveryKind.EXPORT: 60.0}
        assert [d.key for d in catalog.claim_deliveries("sender", 1.0, 10, leases)] == ["k-2"]
        audit.write({"event": "association", "calling": "CT01", "result": "released"})
    finally:
        audit.close()
        catalog.close()

    db, _ = raw(config, tmp_path)
    try:
        assert versions(db) == [1, 2, 3]
        with db.read() as tx:
            rows = tx.execute("SELECT site, record->>'calling' FROM audit").fetchall()
        assert rows == [(SITE, "CT01")]
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.write() as tx:
            tx.execute("DELETE FROM audit")
    finally:
        db.close()
    # Beside a PostgreSQL catalog nothing is written to files any more.
    assert not (tmp_path / "hot" / backends.AUDIT_DIR).exists()
