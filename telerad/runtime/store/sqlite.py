"""The catalog and job queue in SQLite on the hot volume (WAL, full sync).

`synchronous=FULL` makes every commit durable before it returns: the C-STORE response
waits for it. All writes take the write lock up front (`BEGIN IMMEDIATE`) so a claim or a
completion never interleaves with another; several processes may share the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telerad.api.jobs import Finding, Job, JobState, Lease, WorklistEntry, WorklistJob
from telerad.api.types import Priority
from telerad.runtime.dataset import Header
from telerad.runtime.store import query
from telerad.runtime.store.catalog import (
    HOT,
    Added,
    Completion,
    Delivery,
    DeliveryKind,
    LeaseLost,
    Located,
    NewDelivery,
    NewJob,
    Received,
    Search,
    SearchResult,
    StoredInstance,
    StudyFiles,
    StudySummary,
    UnknownJob,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY,  -- patient id + issuer-free name, as the study carried it
    patient_id TEXT, patient_name TEXT, birth_date TEXT, sex TEXT
);
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
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, last_received);
CREATE INDEX IF NOT EXISTS studies_tier ON studies(tier, last_received);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number);
CREATE INDEX IF NOT EXISTS patients_id ON patients(patient_id);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    modality TEXT, body_part TEXT, series_number TEXT, description TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT NOT NULL, version INTEGER NOT NULL,
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, instance_number TEXT,
    calling_ae TEXT NOT NULL, tier TEXT NOT NULL, path TEXT NOT NULL,
    size INTEGER NOT NULL, received_at REAL NOT NULL,
    rows INTEGER, columns INTEGER, bits_allocated INTEGER, number_of_frames TEXT,
    specific_character_set TEXT,
    PRIMARY KEY (sop_uid, version)
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, model TEXT NOT NULL, priority INTEGER NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    rule TEXT NOT NULL, deidentify INTEGER NOT NULL, notify INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, not_before REAL NOT NULL,
    lease_owner TEXT, lease_token TEXT, lease_expires REAL,
    reason TEXT, findings TEXT NOT NULL DEFAULT '[]', critical INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs(model, state, priority, created_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, target TEXT NOT NULL, key TEXT NOT NULL UNIQUE,
    job_id INTEGER NOT NULL, study_uid TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',          -- pending | delivered | parked
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    created_at REAL NOT NULL, delivered_at REAL, error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
"""

ADDED_INSTANCE_COLUMNS = (
    ("rows", "INTEGER"),
    ("columns", "INTEGER"),
    ("bits_allocated", "INTEGER"),
    ("number_of_frames", "TEXT"),
    ("result_of", "INTEGER"),
    ("specific_character_set", "TEXT"),
)

# Header names of the studies columns study_date .. referring_physician, in order.
_STUDY_KEYS = (
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "referring_physician",
)

_JOB_COLUMNS = (
    "id, study_uid, model, priority, state, attempts, max_attempts, rule, deidentify, notify,"
    " created_at, updated_at, not_before, lease_owner, lease_token, lease_expires, reason,"
    " findings, critical"
)


def _study_values(header: Header) -> tuple[str | None, ...]:
    """The study attributes the catalog indexes, in its column order."""
    return tuple(header.get(k) for k in _STUDY_KEYS)


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SQLiteCatalog:
    """`Catalog` on one SQLite file; safe to share between the process's threads."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self._lock = threading.RLock()
        self._writer_lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            # Catalogs written before these columns existed get them (empty for old rows).
            have = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
            for column, kind in ADDED_INSTANCE_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE instances ADD COLUMN {column} {kind}")
            # Names this catalog in idempotency keys, so that two sites' job 1 differ.
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('instance', ?) ON CONFLICT DO NOTHING",
                (secrets.token_hex(8),),
            )
            self.instance_id: str = db.execute(
                "SELECT value FROM meta WHERE key = 'instance'"
            ).fetchone()[0]

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # Writers in other processes queue on a file lock, which wakes the next one the
        # moment it is released; SQLite's own busy handler would sleep 1, 2, 5, 10 ms...
        with self._lock:
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._writer_lock)

    # -- instances -------------------------------------------------------------
    def versions(self, sop_uid: str) -> list[StoredInstance]:
        rows = self._read(
            "SELECT sop_uid, version, tier, path, size, transfer_syntax FROM instances"
            " WHERE sop_uid = ? ORDER BY version",
            (sop_uid,),
        )
        return [StoredInstance(*row) for row in rows]

    def add_instance(self, header: Header, received: Received, now: float) -> Added:
        v = header.get
        sop = header.sop_instance_uid
        patient_key = f"{v('patient_id') or ''}\x1f{v('patient_name') or ''}"
        expected = header.integer("study_related_instances")
        with self._write() as db:
            version = received.version
            if db.execute(
                "SELECT 1 FROM instances WHERE sop_uid = ? AND version = ?", (sop, version)
            ).fetchone():
                db.execute(
                    "UPDATE instances SET tier = ?, path = ?, size = ?, transfer_syntax = ?,"
                    " calling_ae = ?, received_at = ? WHERE sop_uid = ? AND version = ?",
                    (
                        HOT,
                        str(received.path),
                        received.size,
                        received.transfer_syntax,
                        received.calling_ae,
                        now,
                        sop,
                        version,
                    ),
                )
                return Added(restored=True)
            # An instance counts once in its study, whatever its versions: the study's
            # count and its series' (distinct instances) agree.
            first = db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop,)).fetchone()
            new = int(first is None)
            # A later version is a correction: what it carries replaces what queries see
            # (a job's result describes no study, and never corrects one).
            corrects = not new and received.result_of is None
            self._index_patient(db, patient_key, header, corrects=corrects)
            row = db.execute(
                "SELECT state, patient_key FROM studies WHERE study_uid = ?", (header.study_uid,)
            ).fetchone()
            reopened = row is not None and row[0] == "complete" and received.reopens
            if row is None:
                db.execute(
                    "INSERT INTO studies (study_uid, patient_key, study_date, study_time,"
                    " accession_number, study_id, description, referring_physician,"
                    " expected_instances, instance_count, first_received, last_received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (header.study_uid, patient_key, *_study_values(header), expected, now, now),
                )
            elif received.reopens:
                db.execute(
                    "UPDATE studies SET instance_count = instance_count + ?,"
                    " last_received = ?, expected_instances = COALESCE(?, expected_instances),"
                    " state = 'receiving', round = round + ? WHERE study_uid = ?",
                    (new, now, expected, int(reopened), header.study_uid),
                )
            else:
                # It belongs to the study without making it new again.
                db.execute(
                    "UPDATE studies SET instance_count = instance_count + ? WHERE study_uid = ?",
                    (new, header.study_uid),
                )
            if row is not None and corrects:
                db.execute(
                    "UPDATE studies SET patient_key = ?, study_date = ?, study_time = ?,"
                    " accession_number = ?, study_id = ?, description = ?,"
                    " referring_physician = ? WHERE study_uid = ?",
                    (patient_key, *_study_values(header), header.study_uid),
                )
                if row[1] != patient_key:
                    db.execute(
                        "DELETE FROM patients WHERE patient_key = ? AND NOT EXISTS"
                        " (SELECT 1 FROM studies WHERE patient_key = ?)",
                        (row[1], row[1]),
                    )
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, body_part, series_number,"
                " description) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (series_uid) DO UPDATE"
                " SET modality = excluded.modality, body_part = excluded.body_part,"
                " series_number = excluded.series_number, description = excluded.description"
                " WHERE ?",
                (
                    header.series_uid,
                    header.study_uid,
                    v("modality"),
                    (v("body_part") or "").upper() or None,
                    v("series_number"),
                    v("series_description"),
                    corrects,
                ),
            )
            db.execute(
                "INSERT INTO instances (sop_uid, version, study_uid, series_uid, sop_class_uid,"
                " transfer_syntax, instance_number, calling_ae, tier, path, size, received_at,"
                " rows, columns, bits_allocated, number_of_frames, result_of,"
                " specific_character_set)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sop,
                    version,
                    header.study_uid,
                    header.series_uid,
                    header.sop_class_uid,
                    received.transfer_syntax,
                    v("instance_number"),
                    received.calling_ae,
                    HOT,
                    str(received.path),
                    received.size,
                    now,
                    header.integer("rows"),
                    header.integer("columns"),
                    header.integer("bits_allocated"),
                    v("number_of_frames"),
                    received.result_of,
                    v("specific_character_set"),
                ),
            )
        return Added(reopened=reopened)

    @staticmethod
    def _index_patient(
        db: sqlite3.Connection, patient_key: str, header: Header, *, corrects: bool
    ) -> None:
        v = header.get
        db.execute(
            "INSERT INTO patients (patient_key, patient_id, patient_name, birth_date, sex)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (patient_key) DO UPDATE"
            " SET birth_date = excluded.birth_date, sex = excluded.sex WHERE ?",
            (
                patient_key,
                v("patient_id"),
                v("patient_name"),
                v("patient_birth_date"),
                v("patient_sex"),
                corrects,
            ),
        )

    def search(self, search: Search) -> SearchResult:
        sql, args, names = query.build(search)
        rows = self._read(sql, tuple(args))
        return SearchResult(
            rows=[dict(zip(names, row, strict=True)) for row in rows[: search.limit]],
            more=len(rows) > search.limit,
        )

    def catalogued_paths(self, tier: str, study_uid: str) -> set[str]:
        rows = self._read(
            "SELECT path FROM instances WHERE study_uid = ? AND tier = ?", (study_uid, tier)
        )
        return {r[0] for r in rows}

    def locate(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[Located]:
        rows = self._read(
            "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax,"
            " i.tier, i.path, i.size FROM instances i"
            " JOIN studies s ON s.study_uid = i.study_uid AND s.deleting = 0"
            " WHERE i.study_uid = ? AND (? IS NULL OR i.series_uid = ?)"
            " AND (? IS NULL OR i.sop_uid = ?)"
            " AND i.version = (SELECT MAX(version) FROM instances v WHERE v.sop_uid = i.sop_uid)"
            " ORDER BY i.series_uid, CAST(i.instance_number AS INTEGER), i.sop_uid",
            (study_uid, series_uid, series_uid, sop_uid, sop_uid),
        )
        return [Located(*row) for row in rows]

    # -- completion ------------------------------------------------------------
    def due_studies(self, quiet_before: float) -> list[str]:
        rows = self._read(
            "SELECT study_uid FROM studies WHERE state = 'receiving' AND deleting = 0 AND"
            " (last_received <= ? OR instance_count >= expected_instances)"
            " ORDER BY first_received",
            (quiet_before,),
        )
        return [r[0] for r in rows]

    def renew_quiet(self, now: float) -> int:
        with self._write() as db:
            return db.execute(
                "UPDATE studies SET last_received = ? WHERE state = 'receiving' AND"
                " deleting = 0 AND last_received < ?",
                (now, now),
            ).rowcount

    def summary(self, study_uid: str) -> StudySummary:
        with self._lock:
            study = self._db.execute(
                "SELECT round, description, instance_count, first_received FROM studies"
                " WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if study is None:
                raise KeyError(study_uid)
            series = self._db.execute(
                "SELECT modality, body_part FROM series WHERE study_uid = ?", (study_uid,)
            ).fetchall()
            instances = self._db.execute(
                "SELECT DISTINCT sop_class_uid, calling_ae FROM instances WHERE study_uid = ?",
                (study_uid,),
            ).fetchall()
        return StudySummary(
            study_uid=study_uid,
            round=study[0],
            modalities=frozenset(m for m, _ in series if m),
            body_parts=frozenset(b for _, b in series if b),
            sop_classes=frozenset(c for c, _ in instances),
            calling_ae_titles=frozenset(a for _, a in instances),
            description=study[1] or "",
            instances=study[2],
            first_received=study[3],
        )

    def complete_study(
        self, study_uid: str, round_: int, jobs: list[NewJob], now: float, max_attempts: int
    ) -> Completion | None:
        with self._write() as db:
            row = db.execute(
                "SELECT round, state, first_received FROM studies WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if row is None or row[0] != round_ or row[1] != "receiving":
                return None
            waiting = {
                r[0]
                for r in db.execute(
                    "SELECT model FROM jobs WHERE study_uid = ? AND state = 'queued'",
                    (study_uid,),
                )
            }
            ids = []
            for job in jobs:
                if job.model in waiting:
                    continue
                cursor = db.execute(
                    "INSERT INTO jobs (study_uid, model, priority, state, max_attempts, rule,"
                    " deidentify, notify, created_at, updated_at, not_before)"
                    " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                    (
                        study_uid,
                        job.model,
                        job.priority.rank,
                        max_attempts,
                        job.rule,
                        int(job.deidentify),
                        int(job.notify),
                        now,
                        now,
                        now,
                    ),
                )
                ids.append(cursor.lastrowid)
            db.execute(
                "UPDATE studies SET state = 'complete', completed_at = ? WHERE study_uid = ?",
                (now, study_uid),
            )
            self._rank(db, study_uid)
            created = [self._job(db, i) for i in ids if i is not None]
        return Completion(jobs=created, first_received=row[2])

    # -- jobs ------------------------------------------------------------------
    def claim(self, model: str, owner: str, lease_seconds: int, now: float) -> Job | None:
        with self._write() as db:
            while True:
                row = db.execute(
                    "SELECT id, attempts, max_attempts, state FROM jobs WHERE model = ? AND"
                    " ((state = 'queued' AND not_before <= ?) OR"
                    " (state = 'leased' AND lease_expires <= ?))"
                    " ORDER BY priority, created_at, id LIMIT 1",
                    (model, now, now),
                ).fetchone()
                if row is None:
                    return None
                job_id, attempts, max_attempts, state = row
                if state == JobState.LEASED and attempts >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state = 'parked', reason = ?, updated_at = ?,"
                        " lease_token = NULL WHERE id = ?",
                        (f"lease expired on each of {attempts} attempts", now, job_id),
                    )
                    continue
                db.execute(
                    "UPDATE jobs SET state = 'leased', attempts = attempts + 1,"
                    " lease_owner = ?, lease_token = ?, lease_expires = ?, updated_at = ?"
                    " WHERE id = ?",
                    (owner, secrets.token_urlsafe(24), now + lease_seconds, now, job_id),
                )
                return self._job(db, job_id)

    def _leased(self, db: sqlite3.Connection, job_id: int, token: str) -> None:
        row = db.execute("SELECT state, lease_token FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        state, held = row
        # An expired lease still counts until another worker claims the job (which changes
        # the token): a worker that finishes late is still the only one that finished.
        if state != JobState.LEASED or held is None or not secrets.compare_digest(held, token):
            raise LeaseLost(f"job {job_id} is {state} and not leased under this token")

    def extend(self, job_id: int, token: str, lease_seconds: int, now: float) -> Job:
        with self._write() as db:
            self._leased(db, job_id, token)
            db.execute(
                "UPDATE jobs SET lease_expires = ?, updated_at = ? WHERE id = ?",
                (now + lease_seconds, now, job_id),
            )
            return self._job(db, job_id)

    def leased_job(self, job_id: int, token: str) -> Job:
        with self._lock:
            self._leased(self._db, job_id, token)
            return self._job(self._db, job_id)

    def complete_job(
        self,
        job_id: int,
        token: str,
        findings: list[Finding],
        critical: bool,
        now: float,
        *,
        deliveries: Sequence[NewDelivery] = (),
    ) -> Job:
        with self._write() as db:
            self._leased(db, job_id, token)
            db.execute(
                "UPDATE jobs SET state = 'done', findings = ?, critical = ?, reason = NULL,"
                " lease_token = NULL, updated_at = ? WHERE id = ?",
                (
                    json.dumps([f.model_dump(mode="json") for f in findings]),
                    int(critical),
                    now,
                    job_id,
                ),
            )
            study_uid, newer = db.execute(
                "SELECT j.study_uid, EXISTS (SELECT 1 FROM jobs n WHERE n.study_uid ="
                " j.study_uid AND n.model = j.model AND n.state = 'done' AND n.id > j.id)"
                " FROM jobs j WHERE j.id = ?",
                (job_id,),
            ).fetchone()
            self._rank(db, study_uid)
            for d in () if newer else deliveries:
                db.execute(
                    "INSERT INTO outbox (kind, target, key, job_id, study_uid, payload,"
                    " next_attempt, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        d.kind,
                        d.target,
                        f"{self.instance_id}-{job_id}-{d.kind}-{d.target}",
                        job_id,
                        study_uid,
                        d.payload,
                        now,
                        now,
                    ),
                )
            return self._job(db, job_id)

    @staticmethod
    def _rank(db: sqlite3.Connection, study_uid: str) -> None:
        """The study's worklist priority and critical flag, from the newest job of each of
        its models: the most urgent of their priorities, stat when the newest done one of
        some model found something critical (a re-read that finds nothing lowers it)."""
        rank, critical = db.execute(
            "SELECT (SELECT MIN(priority) FROM jobs WHERE id IN"
            " (SELECT MAX(id) FROM jobs WHERE study_uid = ?1 GROUP BY model)),"
            " (SELECT MAX(critical) FROM jobs WHERE id IN"
            " (SELECT MAX(id) FROM jobs WHERE study_uid = ?1 AND state = 'done' GROUP BY model))",
            (study_uid,),
        ).fetchone()
        if critical:
            rank = Priority.STAT.rank
        db.execute(
            "UPDATE studies SET priority = ?, critical = ? WHERE study_uid = ?",
            (rank, int(bool(critical)), study_uid),
        )

    def fail_job(
        self, job_id: int, token: str, reason: str, retry_at: float | None, now: float
    ) -> Job:
        with self._write() as db:
            self._leased(db, job_id, token)
            attempts, max_attempts = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if retry_at is None or attempts >= max_attempts:
                db.execute(
                    "UPDATE jobs SET state = 'parked', reason = ?, lease_token = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (reason, now, job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state = 'queued', reason = ?, lease_token = NULL,"
                    " lease_owner = NULL, lease_expires = NULL, not_before = ?,"
                    " updated_at = ? WHERE id = ?",
                    (reason, retry_at, now, job_id),
                )
            return self._job(db, job_id)

    def results(self, job_id: int) -> list[Located]:
        rows = self._read(
            "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax,"
            " i.tier, i.path, i.size FROM instances i WHERE i.result_of = ?"
            " AND i.version = (SELECT MAX(version) FROM instances v WHERE v.sop_uid = i.sop_uid)"
            " ORDER BY i.sop_uid",
            (job_id,),
        )
        return [Located(*row) for row in rows]

    def replaced_results(self, job_id: int) -> list[Located]:
        row = self._read(
            "SELECT MAX(e.id) FROM jobs e JOIN jobs j ON j.id = ? WHERE e.study_uid ="
            " j.study_uid AND e.model = j.model AND e.state = 'done' AND e.id < j.id",
            (job_id,),
        )
        earlier = row[0][0] if row else None
        return [] if earlier is None else self.results(earlier)

    # -- outbox ----------------------------------------------------------------
    def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        rows = self._read(
            "SELECT id, kind, target, key, job_id, study_uid, payload, attempts, created_at"
            " FROM outbox WHERE state = 'pending' AND next_attempt <= ?"
            " ORDER BY next_attempt, id LIMIT ?",
            (now, limit),
        )
        return [
            Delivery(r[0], DeliveryKind(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    def delivered(self, delivery_id: int, now: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?, error = NULL,"
                " attempts = attempts + 1 WHERE id = ?",
                (now, delivery_id),
            )

    def delivery_failed(
        self, delivery_id: int, error: str, retry_at: float | None, now: float
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE outbox SET state = ?, error = ?, attempts = attempts + 1,"
                " next_attempt = ? WHERE id = ?",
                (
                    "parked" if retry_at is None else "pending",
                    error,
                    retry_at if retry_at is not None else now,
                    delivery_id,
                ),
            )

    def delivery_states(self) -> dict[tuple[str, str], int]:
        rows = self._read("SELECT kind, state, count(*) FROM outbox GROUP BY kind, state")
        return {(k, s): n for k, s, n in rows}

    def job(self, job_id: int) -> Job:
        with self._lock:
            return self._job(self._db, job_id)

    def jobs(
        self,
        *,
        state: str | None,
        model: str | None,
        limit: int,
        offset: int,
        claimable_at: float | None = None,
    ) -> list[Job]:
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1) AND"  # noqa: S608
            " (?2 IS NULL OR model = ?2) AND (?5 IS NULL OR"
            " (state = 'queued' AND not_before <= ?5) OR"
            " (state = 'leased' AND lease_expires <= ?5))"
            " ORDER BY priority, created_at, id LIMIT ?3 OFFSET ?4",
            (state, model, limit, offset, claimable_at),
        )
        return [_job_of(row) for row in rows]

    def _job(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",  # noqa: S608
            (job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return _job_of(row)

    def queue_depth(self, now: float) -> dict[tuple[str, Priority], int]:
        rows = self._read(
            "SELECT model, priority, count(*) FROM jobs WHERE state = 'queued' OR"
            " (state = 'leased' AND lease_expires <= ?) GROUP BY model, priority",
            (now,),
        )
        return {(m, Priority.of_rank(p)): n for m, p, n in rows}

    def queue_oldest(self, now: float) -> dict[tuple[str, Priority], float]:
        rows = self._read(
            "SELECT model, priority, min(created_at) FROM jobs WHERE state = 'queued' OR"
            " (state = 'leased' AND lease_expires <= ?) GROUP BY model, priority",
            (now,),
        )
        return {(m, Priority.of_rank(p)): float(t) for m, p, t in rows}

    def job_states(self) -> dict[tuple[str, str], int]:
        rows = self._read("SELECT model, state, count(*) FROM jobs GROUP BY model, state")
        return {(m, s): n for m, s, n in rows}

    def worklist(self, limit: int, offset: int) -> list[WorklistEntry]:
        with self._lock:
            studies = self._db.execute(
                "SELECT study_uid, priority, state, critical, first_received, completed_at,"
                " instance_count FROM studies WHERE deleting = 0"
                " ORDER BY priority IS NULL, priority, critical DESC, first_received"
                " LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            out = []
            for uid, prio, state, critical, first, completed, count in studies:
                modalities = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT DISTINCT modality FROM series WHERE study_uid = ? AND"
                        " modality IS NOT NULL ORDER BY modality",
                        (uid,),
                    )
                ]
                jobs = [
                    WorklistJob(id=i, model=m, state=JobState(s), critical=bool(c))
                    for i, m, s, c in self._db.execute(
                        "SELECT id, model, state, critical FROM jobs WHERE study_uid = ?"
                        " ORDER BY id",
                        (uid,),
                    )
                ]
                out.append(
                    WorklistEntry(
                        study_uid=uid,
                        priority=None if prio is None else Priority.of_rank(prio),
                        complete=state == "complete",
                        critical=bool(critical),
                        received_at=datetime.fromtimestamp(first, UTC),
                        completed_at=_time(completed),
                        modalities=modalities,
                        instances=count,
                        jobs=jobs,
                    )
                )
        return out

    # -- lifecycle -------------------------------------------------------------
    def lifecycle_candidates(
        self, tier: str, last_received_before: float, limit: int
    ) -> list[StudyFiles]:
        rows = self._read(
            "SELECT study_uid FROM studies WHERE tier = ? AND deleting = 0 AND"
            " state = 'complete' AND last_received <= ? ORDER BY last_received LIMIT ?",
            (tier, last_received_before, limit),
        )
        return [self._files(r[0]) for r in rows]

    def deleting_studies(self) -> list[StudyFiles]:
        return [
            self._files(r[0]) for r in self._read("SELECT study_uid FROM studies WHERE deleting")
        ]

    def _files(self, study_uid: str) -> StudyFiles:
        with self._lock:
            tier, deleting = self._db.execute(
                "SELECT tier, deleting FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            paths = [
                r[0]
                for r in self._db.execute(
                    "SELECT path FROM instances WHERE study_uid = ? ORDER BY path", (study_uid,)
                )
            ]
        return StudyFiles(study_uid=study_uid, tier=tier, deleting=bool(deleting), paths=paths)

    def set_tier(self, study_uid: str, tier: str, paths: list[str]) -> None:
        with self._write() as db:
            db.execute("UPDATE studies SET tier = ? WHERE study_uid = ?", (tier, study_uid))
            db.executemany(
                "UPDATE instances SET tier = ? WHERE study_uid = ? AND path = ?",
                [(tier, study_uid, path) for path in paths],
            )

    def mark_deleting(self, study_uid: str) -> None:
        with self._write() as db:
            db.execute("UPDATE studies SET deleting = 1 WHERE study_uid = ?", (study_uid,))

    def forget_study(self, study_uid: str) -> None:
        with self._write() as db:
            for table in ("jobs", "instances", "series", "studies"):
                db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))  # noqa: S608
            db.execute(
                "DELETE FROM patients WHERE patient_key NOT IN"
                " (SELECT patient_key FROM studies WHERE patient_key IS NOT NULL)"
            )


def _job_of(row: tuple[Any, ...]) -> Job:
    (
        job_id,
        study_uid,
        model,
        priority,
        state,
        attempts,
        max_attempts,
        rule,
        deidentify,
        notify,
        created,
        updated,
        not_before,
        owner,
        token,
        expires,
        reason,
        findings,
        critical,
    ) = row
    lease = (
        Lease(owner=owner, token=token, expires_at=datetime.fromtimestamp(expires, UTC))
        if state == JobState.LEASED and token
        else None
    )
    return Job(
        id=job_id,
        study_uid=study_uid,
        model=model,
        priority=Priority.of_rank(priority),
        state=JobState(state),
        attempts=attempts,
        max_attempts=max_attempts,
        rule=rule,
        deidentify=bool(deidentify),
        notify=bool(notify),
        created_at=datetime.fromtimestamp(created, UTC),
        updated_at=datetime.fromtimestamp(updated, UTC),
        not_before=_time(not_before) if state == JobState.QUEUED else None,
        lease=lease,
        reason=reason,
        findings=[Finding.model_validate(f) for f in json.loads(findings)],
        critical=bool(critical),
    )
