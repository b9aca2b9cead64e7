"""The SQLite catalog's schema, as versioned migrations (the version is in the
`schema_migrations` table; `telerad.runtime.store.sql.migrate` applies them)."""

from __future__ import annotations

from telerad.runtime.store.sql.database import Transaction
from telerad.runtime.store.sql.migrate import Migration

MIGRATIONS: list[Migration] = [
    # 1: the catalog, the job queue and the outbox.
    (
        """
        CREATE TABLE IF NOT EXISTS patients (
            patient_key TEXT PRIMARY KEY,  -- patient id + issuer-free name, as the study carried it
            patient_id TEXT, patient_name TEXT, birth_date TEXT, sex TEXT
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS studies (
            study_uid TEXT PRIMARY KEY,
            patient_key TEXT REFERENCES patients(patient_key),
            study_date TEXT, study_time TEXT, accession_number TEXT, study_id TEXT,
            description TEXT, referring_physician TEXT,
            state TEXT NOT NULL DEFAULT 'receiving',        -- receiving | complete
            tier TEXT NOT NULL DEFAULT 'hot',
            deleting INTEGER NOT NULL DEFAULT 0,
            round INTEGER NOT NULL DEFAULT 1,
            expected_instances INTEGER,
            instance_count INTEGER NOT NULL DEFAULT 0,
            first_received REAL NOT NULL, last_received REAL NOT NULL, completed_at REAL,
            priority INTEGER, critical INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_received)
        """,
        """
        CREATE INDEX IF NOT EXISTS studies_tier ON studies(tier, last_received)
        """,
        """
        CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date)
        """,
        """
        CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number)
        """,
        """
        CREATE INDEX IF NOT EXISTS patients_id ON patients(patient_id)
        """,
        """
        CREATE TABLE IF NOT EXISTS series (
            series_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            modality TEXT, body_part TEXT, series_number TEXT, description TEXT
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS series_study ON series(study_uid)
        """,
        """
        CREATE TABLE IF NOT EXISTS instances (
            sop_uid TEXT NOT NULL, version INTEGER NOT NULL,
            study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, instance_number TEXT,
            calling_ae TEXT NOT NULL, tier TEXT NOT NULL, path TEXT NOT NULL,
            size INTEGER NOT NULL, received_at REAL NOT NULL,
            rows INTEGER, columns INTEGER, bits_allocated INTEGER, number_of_frames TEXT,
            result_of INTEGER, specific_character_set TEXT,
            PRIMARY KEY (sop_uid, version)
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid)
        """,
        """
        CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid)
        """,
        """
        CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            study_uid TEXT NOT NULL, model TEXT NOT NULL, priority INTEGER NOT NULL,
            state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
            rule TEXT NOT NULL, deidentify INTEGER NOT NULL, notify INTEGER NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, not_before REAL NOT NULL,
            lease_owner TEXT, lease_token TEXT, lease_expires REAL,
            reason TEXT, findings TEXT NOT NULL DEFAULT '[]', critical INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(model, state, priority, created_at)
        """,
        """
        CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL, target TEXT NOT NULL, key TEXT NOT NULL UNIQUE,
            job_id INTEGER NOT NULL, study_uid TEXT NOT NULL, payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',          -- pending | delivered | parked
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
            created_at REAL NOT NULL, delivered_at REAL, error TEXT
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt)
        """,
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
        """,
        """
        CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid)
        """,
    ),
    # 2: outbox rows leased to the sender that sends them.
    ("ALTER TABLE outbox ADD COLUMN lease_owner TEXT",),
]

# Columns that catalogs from before versioned migrations gained one by one.
_ADDED_BEFORE_VERSIONS = (
    ("rows", "INTEGER"),
    ("columns", "INTEGER"),
    ("bits_allocated", "INTEGER"),
    ("number_of_frames", "TEXT"),
    ("result_of", "INTEGER"),
    ("specific_character_set", "TEXT"),
)


def unversioned(tx: Transaction) -> int:
    """The version of a catalog written before versions were recorded: 0 when there is
    none, else 1 once the columns it may lack are added (empty for its old rows)."""
    if tx.execute("SELECT 1 FROM sqlite_master WHERE name = 'instances'").fetchone() is None:
        return 0
    have = {row[1] for row in tx.execute("PRAGMA table_info(instances)").fetchall()}
    for column, kind in _ADDED_BEFORE_VERSIONS:
        if column not in have:
            tx.execute(f"ALTER TABLE instances ADD COLUMN {column} {kind}")
    return 1
