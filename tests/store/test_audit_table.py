"""The audit trail on PostgreSQL is append-only in the database itself. The gateway's role
(the login role that owns the catalog's database and runs its migrations, as
CloudNativePG's application user does) may INSERT and SELECT its site's records; UPDATE,
DELETE and TRUNCATE fail for it (its privileges are revoked) and for a superuser too (a
trigger refuses them). Two sites on one database see only their own records. What
docs/catalog.md tells an administrator to run (the retention job, another owner for the
table) does what it says."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from telerad.api.config import CatalogConfig
from telerad.runtime.gateway.example import example_config
from telerad.runtime.store import backends
from telerad.runtime.store.audit import AuditTrail
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.postgres.audit import AuditTable
from tests.postgres import ROOT, DatabaseInfo, PostgresServer

CHANGES = (
    "UPDATE audit SET record = '{}'",
    "DELETE FROM audit",
    "TRUNCATE audit",
)


@dataclass
class Site:
    catalog: Catalog
    audit: AuditTrail


@pytest.fixture
def database(postgres: PostgresServer) -> DatabaseInfo:
    return postgres.create_database(f"a{secrets.token_hex(6)}")


@pytest.fixture
def sites(database: DatabaseInfo, tmp_path: Path) -> Iterator[dict[str, Site]]:
    """Sites `north` and `south` on one database, each opened as its gateway opens it."""
    opened: dict[str, Site] = {}
    try:
        for name in ("north", "south"):
            catalog = CatalogConfig(url=database.url, password_file=database.password_file)
            config = example_config(11112, 8080, tmp_path / name, catalog).model_copy(
                update={"site": name}
            )
            site = backends.open_site(config)
            opened[name] = Site(site, backends.open_audit(config, site))
        yield opened
    finally:
        for site in opened.values():
            site.audit.close()
            site.catalog.close()


def as_gateway(database: DatabaseInfo, site: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection of the gateway's role, bound to `site` as the gateway's pool binds it."""
    conn = psycopg.connect(database.url, password=database.password, connect_timeout=10)
    conn.execute("SELECT set_config('telerad.site', %s, false)", (site,))
    conn.commit()
    return conn


def test_the_gateway_role_may_insert_and_select_but_never_change_the_trail(
    sites: dict[str, Site], database: DatabaseInfo, postgres: PostgresServer
) -> None:
    north = sites["north"].audit
    assert isinstance(north, AuditTable)
    north.write({"event": "association", "calling": "CT01", "result": "released"})
    north.write({"method": "GET", "route": "/studies", "status": 200})

    with as_gateway(database, "north") as conn:
        role = conn.execute("SELECT current_user, rolsuper FROM pg_roles"
                            " WHERE rolname = current_user").fetchone()  # fmt: skip
        assert role == (database.role, False)
        granted = {
            privilege: conn.execute(
                "SELECT has_table_privilege('audit', %s)", (privilege,)
            ).fetchone()
            for privilege in ("INSERT", "SELECT", "UPDATE", "DELETE", "TRUNCATE")
        }
        assert granted == {
            "INSERT": (True,),
            "SELECT": (True,),
            "UPDATE": (False,),
            "DELETE": (False,),
            "TRUNCATE": (False,),
        }
        for statement in CHANGES:
            with pytest.raises(
                errors.InsufficientPrivilege, match="permission denied for table audit"
            ):
                conn.execute(statement)
            conn.rollback()
        kept = conn.execute("SELECT record FROM audit ORDER BY id").fetchall()
    assert [r[0].get("calling") for r in kept] == ["CT01", None]
    assert all(r[0]["time"].endswith("+00:00") for r in kept)

    # Nor may anyone else while the trigger stands: not even a superuser, who has every
    # privilege and passes every row-level policy.
    with psycopg.connect(postgres.admin_url, dbname=database.name) as admin:
        for statement in CHANGES:
            operation = statement.split()[0]
            with pytest.raises(
                errors.InsufficientPrivilege,
                match=f"the audit trail is append-only: {operation} on table audit is refused",
            ):
                admin.execute(statement)
            admin.rollback()
        assert admin.execute("SELECT count(*) FROM audit").fetchone() == (2,)


def test_two_sites_on_one_database_see_only_their_own_records(
    sites: dict[str, Site], database: DatabaseInfo
) -> None:
    sites["north"].audit.write({"event": "association", "calling": "NORTH_CT"})
    sites["south"].audit.write({"event": "association", "calling": "SOUTH_MR"})
    sites["south"].audit.write({"event": "association", "calling": "SOUTH_CT"})

    for site, callers in (("north", ["NORTH_CT"]), ("south", ["SOUTH_MR", "SOUTH_CT"])):
        with as_gateway(database, site) as conn:
            rows = conn.execute("SELECT site, record->>'calling' FROM audit ORDER BY id")
            assert rows.fetchall() == [(site, c) for c in callers]
            # Nor can it write a record in the other's name.
            other = "south" if site == "north" else "north"
            with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
                conn.execute("INSERT INTO audit (site, at, record) VALUES (%s, 0, '{}')", (other,))


def documented(n: int) -> str:
    """The `n`th SQL block of docs/catalog.md's "The audit trail", as an administrator
    would paste it."""
    text = (ROOT / "docs" / "catalog.md").read_text()
    section = text.split("\n## The audit trail\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.DOTALL)[n]


def test_the_documented_retention_job_removes_every_sites_old_records_only(
    sites: dict[str, Site], database: DatabaseInfo
) -> None:
    with as_gateway(database, "north") as conn:
        conn.execute("INSERT INTO audit (at, record) VALUES (0, '{\"old\": 1}')")
        conn.commit()
    with as_gateway(database, "south") as conn:
        conn.execute("INSERT INTO audit (at, record) VALUES (0, '{\"old\": 1}')")
        conn.commit()
    sites["north"].audit.write({"event": "association", "calling": "NORTH_CT"})
    sites["south"].audit.write({"event": "association", "calling": "SOUTH_MR"})

    # As the table's owner: the gateway's own role, with no site set.
    with psycopg.connect(
        database.url, password=database.password, autocommit=True, connect_timeout=10
    ) as owner:
        owner.execute(documented(1))
    for site, caller in (("north", "NORTH_CT"), ("south", "SOUTH_MR")):
        with as_gateway(database, site) as conn:
            rows = conn.execute("SELECT record->>'calling' FROM audit").fetchall()
            assert rows == [(caller,)]
            # Append-only again.
            with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
                conn.execute("DELETE FROM audit")


def test_a_trail_owned_by_another_role_is_out_of_the_gateways_reach(
    sites: dict[str, Site], database: DatabaseInfo, postgres: PostgresServer
) -> None:
    owner = f"audit_owner_{secrets.token_hex(4)}"
    with psycopg.connect(postgres.admin_url, dbname=database.name, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner)))
        recipe = documented(0).replace("audit_owner", owner).replace("telerad", database.role)
        admin.execute(recipe)
    north = sites["north"].audit
    north.write({"event": "association", "calling": "NORTH_CT"})
    with as_gateway(database, "north") as conn:
        assert conn.execute("SELECT record->>'calling' FROM audit").fetchall() == [("NORTH_CT",)]
        with pytest.raises(errors.InsufficientPrivilege, match="must be owner of table audit"):
            conn.execute("ALTER TABLE audit DISABLE TRIGGER append_only")
        conn.rollback()
        # Not the owner, it holds no grant option: the grant gives nothing (a warning).
        conn.execute("GRANT DELETE ON audit TO CURRENT_USER")
        assert conn.execute("SELECT has_table_privilege('audit', 'DELETE')").fetchone() == (False,)
        with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("DELETE FROM audit")
