"""The PostgreSQL catalog's schema, as versioned migrations (the version is in the
`schema_migrations` table; `telerad.runtime.store.sql.migrate` applies them, one migrator
at a time).

Every table carries the site, first in its keys, and defaults it from the connection's
`telerad.site`; a row-level security policy, forced on the owner too, shows and accepts
only that site's rows. Times are seconds since the epoch, as the SQLite catalog keeps them.
"""

from __future__ import annotations

from telerad.runtime.store.sql.migrate import Migration

SITE = "site TEXT NOT NULL DEFAULT current_setting('telerad.site')"
TABLES = ("patients", "studies", "series", "instances", "jobs", "outbox", "meta")


def _own_site(table: str) -> tuple[str, ...]:
    return (
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY own_site ON {table} USING (site = current_setting('telerad.site'))"
        " WITH CHECK (site = current_setting('telerad.site'))",
    )


MIGRATIONS: list[Migration] = [
    # 1: the catalog, the job queue and the outbox.
    (
        f"""CREATE TABLE patients (
            {SITE},
            patient_key TEXT NOT NULL,
            patient_id TEXT, patient_name TEXT, birth_date TEXT, sex TEXT,
            PRIMARY KEY (site, patient_key)
        )""",
        f"""CREATE TABLE studies (
            {SITE},
            study_uid TEXT NOT NULL,
            patient_key TEXT,
            study_date TEXT, study_time TEXT, accession_number TEXT, study_id TEXT,
            description TEXT, referring_physician TEXT,
            state TEXT NOT NULL DEFAULT 'receiving',
            tier TEXT NOT NULL DEFAULT 'hot',
            deleting INTEGER NOT NULL DEFAULT 0,
            round INTEGER NOT NULL DEFAULT 1,
            expected_instances INTEGER,
            instance_count INTEGER NOT NULL DEFAULT 0,
            first_received DOUBLE PRECISION NOT NULL,
            last_received DOUBLE PRECISION NOT NULL,
            completed_at DOUBLE PRECISION,
            priority INTEGER, critical INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (site, study_uid),
            FOREIGN KEY (site, patient_key) REFERENCES patients (site, patient_key)
        )""",
        "CREATE INDEX studies_state ON studies (site, state, last_received)",
        "CREATE INDEX studies_tier ON studies (site, tier, last_received)",
        "CREATE INDEX studies_date ON studies (site, study_date)",
        "CREATE INDEX studies_accession ON studies (site, accession_number)",
        "CREATE INDEX patients_id ON patients (site, patient_id)",
        f"""CREATE TABLE series (
            {SITE},
            series_uid TEXT NOT NULL,
            seq BIGSERIAL,
            study_uid TEXT NOT NULL,
            modality TEXT, body_part TEXT, series_number TEXT, description TEXT,
            PRIMARY KEY (site, series_uid),
            FOREIGN KEY (site, study_uid) REFERENCES studies (site, study_uid)
        )""",
        "CREATE INDEX series_study ON series (site, study_uid)",
        f"""CREATE TABLE instances (
            {SITE},
            sop_uid TEXT NOT NULL, version INTEGER NOT NULL,
            study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, instance_number TEXT,
            calling_ae TEXT NOT NULL, tier TEXT NOT NULL, path TEXT NOT NULL,
            size BIGINT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
            rows INTEGER, columns INTEGER, bits_allocated INTEGER, number_of_frames TEXT,
            result_of BIGINT, specific_character_set TEXT,
            PRIMARY KEY (site, sop_uid, version)
        )""",
        "CREATE INDEX instances_series ON instances (site, series_uid)",
        "CREATE INDEX instances_study ON instances (site, study_uid)",
        "CREATE INDEX instances_result ON instances (site, result_of)",
        f"""CREATE TABLE jobs (
            {SITE},
            id BIGSERIAL PRIMARY KEY,
            study_uid TEXT NOT NULL, model TEXT NOT NULL, priority INTEGER NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            rule TEXT NOT NULL, deidentify INTEGER NOT NULL, notify INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            not_before DOUBLE PRECISION NOT NULL,
            lease_owner TEXT, lease_token TEXT, lease_expires DOUBLE PRECISION,
            reason TEXT, findings TEXT NOT NULL DEFAULT '[]',
            critical INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX jobs_claim ON jobs (site, model, state, priority, created_at)",
        "CREATE INDEX jobs_study ON jobs (site, study_uid)",
        f"""CREATE TABLE outbox (
            {SITE},
            id BIGSERIAL PRIMARY KEY,
            kind TEXT NOT NULL, target TEXT NOT NULL, key TEXT NOT NULL UNIQUE,
            job_id BIGINT NOT NULL, study_uid TEXT NOT NULL, payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt DOUBLE PRECISION NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, delivered_at DOUBLE PRECISION, error TEXT
        )""",
        "CREATE INDEX outbox_due ON outbox (site, state, next_attempt)",
        f"""CREATE TABLE meta (
            {SITE},
            key TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (site, key)
        )""",
        *(statement for table in TABLES for statement in _own_site(table)),
    ),
    # 2: outbox rows leased to the sender that sends them.
    ("ALTER TABLE outbox ADD COLUMN lease_owner TEXT",),
    # 3: the audit trail, append-only.
    (
        f"""CREATE TABLE audit (
            {SITE},
            id BIGSERIAL,
            at DOUBLE PRECISION NOT NULL,
            record JSONB NOT NULL,
            PRIMARY KEY (site, id)
        )""",
        "CREATE INDEX audit_time ON audit (site, at)",
        *_own_site("audit"),
        # The gateway's role owns the schema it migrates: it gives up changing the trail,
        # and the trigger refuses it to every role, the owner and superusers too, until an
        # administrator disables it to remove old records (docs/catalog.md).
        "REVOKE UPDATE, DELETE, TRUNCATE ON audit FROM PUBLIC, CURRENT_USER",
        """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the audit trail is append-only: % on table audit is refused',
                TG_OP
                USING ERRCODE = 'insufficient_privilege',
                HINT = 'records are removed by the database administrator, with this'
                    ' trigger disabled (telerad docs/catalog.md, "The audit trail")';
        END
        $$""",
        "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON audit"
        " FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
        "CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
    ),
]
