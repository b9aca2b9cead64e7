"""The catalog's ports in SQL, on any backend's `Database`.

Every statement is written once, for SQLite and PostgreSQL alike, with `?` parameters; the
phrases the two spell differently come from the backend's `Dialect` (constants: they are
the only text formatted into a statement, never a value). A backend keeps its
sites apart below these statements (a file per site; row-level security on a shared
database), so none of them names a site.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from telerad.api.config import HOT
from telerad.api.jobs import Finding, Job, JobState, Lease, WorklistEntry, WorklistJob
from telerad.api.types import Priority
from telerad.runtime.dataset import Header
from telerad.runtime.store.catalog import (
    Added,
    Completion,
    Delivery,
    DeliveryKind,
    LeaseLost,
    Located,
    NewDelivery,
    NewJob,
    Received,
    StoredInstance,
    StudyFiles,
    StudySummary,
    UnknownJob,
)
from telerad.runtime.store.search import Search, SearchResult
from telerad.runtime.store.sql import search as searches
from telerad.runtime.store.sql.database import Database, Transaction

JOBS_CHANNEL = "telerad_jobs"
"""Where a catalog says that jobs were queued (the payload names their model)."""

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


class SQLCatalog:
    """`Catalog` on one backend's `Database`, for the site that database serves."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.backend = db.dialect.name
        self._dialect = db.dialect
        self._subscribers: list[Callable[[str], None]] = []
        self._skip_locked = f"{db.dialect.for_update} SKIP LOCKED" if db.dialect.for_update else ""
        with db.write() as tx:
            # Names this catalog in idempotency keys, so that two sites' job 1 differ.
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('instance', ?) ON CONFLICT DO NOTHING",
                (secrets.token_hex(8),),
            )
            self.instance_id: str = tx.execute(
                "SELECT value FROM meta WHERE key = 'instance'"
            ).fetchone()[0]

    def subscribe(self, wake: Callable[[str], None]) -> None:
        if not self._subscribers:
            self.db.listen(JOBS_CHANNEL, self._heard)
        self._subscribers.append(wake)

    def _heard(self, model: str) -> None:
        for wake in self._subscribers:
            wake(model)

    def _queued(self, db: Transaction, models: Iterable[str]) -> list[str]:
        """Tell the other processes, on commit, that jobs of these models wait; returns
        the models, for this process's own subscribers once the commit is done."""
        models = sorted(set(models))
        if self._dialect.notify is not None:
            for model in models:
                db.execute(self._dialect.notify, (JOBS_CHANNEL, model))
        return models

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self.db.query(sql, args)

    def _lock_study(self, tx: Transaction, study_uid: str) -> None:
        if self._dialect.lock_study is not None:
            tx.execute(self._dialect.lock_study, (study_uid,))

    def close(self) -> None:
        self.db.close()

    # -- instances -------------------------------------------------------------
    def versions(self, sop_uid: str) -> list[StoredInstance]:
        rows = self._read(
            "SELECT sop_uid, version, tier, path, size, transfer_syntax, result_of FROM instances"
            " WHERE sop_uid = ? ORDER BY version",
            (sop_uid,),
        )
        return [StoredInstance(*row) for row in rows]

    def stored(self) -> list[StoredInstance]:
        rows = self._read(
            "SELECT sop_uid, version, tier, path, size, transfer_syntax, result_of FROM instances"
            " ORDER BY received_at, sop_uid, version"
        )
        return [StoredInstance(*row) for row in rows]

    def add_instance(self, header: Header, received: Received, now: float) -> Added:
        v = header.get
        sop = header.sop_instance_uid
        patient_key = f"{v('patient_id') or ''}\x1f{v('patient_name') or ''}"
        expected = header.integer("study_related_instances")
        with self.db.write() as db:
            self._lock_study(db, header.study_uid)
            version = received.version
            # What the rest depends on, in one statement: on a database server each is a
            # round trip, most of what a catalogued instance costs.
            exists, first, state, old_key, series = db.execute(
                "SELECT EXISTS (SELECT 1 FROM instances WHERE sop_uid = ? AND version = ?),"
                " EXISTS (SELECT 1 FROM instances WHERE sop_uid = ?),"
                " (SELECT state FROM studies WHERE study_uid = ?),"
                " (SELECT patient_key FROM studies WHERE study_uid = ?),"
                " EXISTS (SELECT 1 FROM series WHERE series_uid = ?)",
                (sop, version, sop, header.study_uid, header.study_uid, header.series_uid),
            ).fetchone()
            if exists:
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
            new = int(not first)
            # A later version is a correction: what it carries replaces what queries see
            # (a job's result describes no study, and never corrects one).
            corrects = not new and received.result_of is None
            # The study's patient row exists (a key refers to it), and only a correction
            # changes it.
            if corrects or old_key != patient_key:
                self._index_patient(db, patient_key, header, corrects=corrects)
            reopened = state == "complete" and received.reopens
            if state is None:
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
            if state is not None and corrects:
                db.execute(
                    "UPDATE studies SET patient_key = ?, study_date = ?, study_time = ?,"
                    " accession_number = ?, study_id = ?, description = ?,"
                    " referring_physician = ? WHERE study_uid = ?",
                    (patient_key, *_study_values(header), header.study_uid),
                )
                if old_key != patient_key:
                    db.execute(
                        "DELETE FROM patients WHERE patient_key = ? AND NOT EXISTS"
                        " (SELECT 1 FROM studies WHERE patient_key = ?)",
                        (old_key, old_key),
                    )
            # An existing series changes with a correction only.
            if corrects or not series:
                db.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, body_part, series_number,"  # noqa: S608
                    " description) VALUES (?, ?, ?, ?, ?, ?)"
                    f" ON CONFLICT {self._dialect.conflict('series_uid')} DO UPDATE"
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

    def _index_patient(
        self, db: Transaction, patient_key: str, header: Header, *, corrects: bool
    ) -> None:
        v = header.get
        db.execute(
            "INSERT INTO patients (patient_key, patient_id, patient_name, birth_date, sex)"  # noqa: S608
            f" VALUES (?, ?, ?, ?, ?) ON CONFLICT {self._dialect.conflict('patient_key')}"
            " DO UPDATE"
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
        sql, args, names = searches.build(search, self._dialect)
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
            "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax,"  # noqa: S608
            " i.tier, i.path, i.size FROM instances i"
            " JOIN studies s ON s.study_uid = i.study_uid AND s.deleting = 0"
            " WHERE i.study_uid = ? AND (CAST(? AS TEXT) IS NULL OR i.series_uid = ?)"
            " AND (CAST(? AS TEXT) IS NULL OR i.sop_uid = ?)"
            " AND i.version = (SELECT MAX(version) FROM instances v WHERE v.sop_uid = i.sop_uid)"
            f" ORDER BY i.series_uid, {self._dialect.integer('i.instance_number')}, i.sop_uid",
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
        with self.db.write() as db:
            return db.execute(
                "UPDATE studies SET last_received = ? WHERE state = 'receiving' AND"
                " deleting = 0 AND last_received < ?",
                (now, now),
            ).rowcount

    def summary(self, study_uid: str) -> StudySummary:
        with self.db.read() as tx:
            study = tx.execute(
                "SELECT round, description, instance_count, first_received FROM studies"
                " WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if study is None:
                raise KeyError(study_uid)
            series = tx.execute(
                "SELECT modality, body_part FROM series WHERE study_uid = ?", (study_uid,)
            ).fetchall()
            instances = tx.execute(
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
        with self.db.write() as db:
            self._lock_study(db, study_uid)
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
                    " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                ids.append(cursor.fetchone()[0])
            db.execute(
                "UPDATE studies SET state = 'complete', completed_at = ? WHERE study_uid = ?",
                (now, study_uid),
            )
            self._rank(db, study_uid)
            created = [self._job(db, i) for i in ids]
            models = self._queued(db, (j.model for j in created))
        for model in models:
            self._heard(model)
        return Completion(jobs=created, first_received=row[2])

    # -- jobs ------------------------------------------------------------------
    def claim(self, model: str, owner: str, lease_seconds: int, now: float) -> Job | None:
        with self.db.write() as db:
            while True:
                row = db.execute(
                    "SELECT id, attempts, max_attempts, state FROM jobs WHERE model = ? AND"  # noqa: S608
                    " ((state = 'queued' AND not_before <= ?) OR"
                    " (state = 'leased' AND lease_expires <= ?))"
                    f" ORDER BY priority, created_at, id LIMIT 1{self._skip_locked}",
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

    def _leased(self, db: Transaction, job_id: int, token: str) -> None:
        row = db.execute(
            f"SELECT state, lease_token FROM jobs WHERE id = ?{self._dialect.for_update}",  # noqa: S608
            (job_id,),
        ).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        state, held = row
        # An expired lease still counts until another worker claims the job (which changes
        # the token): a worker that finishes late is still the only one that finished.
        if state != JobState.LEASED or held is None or not secrets.compare_digest(held, token):
            raise LeaseLost(f"job {job_id} is {state} and not leased under this token")

    def extend(self, job_id: int, token: str, lease_seconds: int, now: float) -> Job:
        with self.db.write() as db:
            self._leased(db, job_id, token)
            db.execute(
                "UPDATE jobs SET lease_expires = ?, updated_at = ? WHERE id = ?",
                (now + lease_seconds, now, job_id),
            )
            return self._job(db, job_id)

    def leased_job(self, job_id: int, token: str) -> Job:
        with self.db.read() as tx:
            self._leased(tx, job_id, token)
            return self._job(tx, job_id)

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
        with self.db.write() as db:
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

    def _rank(self, db: Transaction, study_uid: str) -> None:
        """The study's worklist priority and critical flag, from the newest job of each of
        its models: the most urgent of their priorities, stat when the newest done one of
        some model found something critical (a re-read that finds nothing lowers it)."""
        # Two jobs of a study done at once each see the other's change.
        self._lock_study(db, study_uid)
        rank, critical = db.execute(
            "SELECT (SELECT MIN(priority) FROM jobs WHERE id IN"
            " (SELECT MAX(id) FROM jobs WHERE study_uid = ? GROUP BY model)),"
            " (SELECT MAX(critical) FROM jobs WHERE id IN"
            " (SELECT MAX(id) FROM jobs WHERE study_uid = ? AND state = 'done' GROUP BY model))",
            (study_uid, study_uid),
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
        with self.db.write() as db:
            self._leased(db, job_id, token)
            attempts, max_attempts = db.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            models: list[str] = []
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
            job = self._job(db, job_id)
            if retry_at is not None and retry_at <= now and job.state == JobState.QUEUED:
                models = self._queued(db, [job.model])
        for model in models:
            self._heard(model)
        return job

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
    def claim_deliveries(
        self, owner: str, now: float, limit: int, lease_seconds: Mapping[DeliveryKind, float]
    ) -> list[Delivery]:
        with self.db.write() as db:
            rows = db.execute(
                "SELECT id, kind, target, key, job_id, study_uid, payload, attempts, created_at"  # noqa: S608
                " FROM outbox WHERE state = 'pending' AND next_attempt <= ?"
                f" ORDER BY next_attempt, id LIMIT ?{self._skip_locked}",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET lease_owner = ?, next_attempt = ? WHERE id = ?",
                [(owner, now + lease_seconds[DeliveryKind(r[1])], r[0]) for r in rows],
            )
        return [
            Delivery(r[0], DeliveryKind(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    def release_deliveries(self, owner: str, now: float) -> int:
        with self.db.write() as db:
            return int(
                db.execute(
                    "UPDATE outbox SET lease_owner = NULL, next_attempt = ?"
                    " WHERE state = 'pending' AND lease_owner = ?",
                    (now, owner),
                ).rowcount
            )

    def delivered(self, delivery_id: int, now: float) -> None:
        with self.db.write() as db:
            db.execute(
                "UPDATE outbox SET state = 'delivered', delivered_at = ?, error = NULL,"
                " lease_owner = NULL, attempts = attempts + 1 WHERE id = ?",
                (now, delivery_id),
            )

    def delivery_failed(
        self, delivery_id: int, error: str, retry_at: float | None, now: float
    ) -> None:
        with self.db.write() as db:
            db.execute(
                "UPDATE outbox SET state = ?, error = ?, attempts = attempts + 1,"
                " lease_owner = NULL, next_attempt = ? WHERE id = ?",
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
        with self.db.read() as tx:
            return self._job(tx, job_id)

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
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE"  # noqa: S608
            " (CAST(? AS TEXT) IS NULL OR state = ?) AND (CAST(? AS TEXT) IS NULL OR model = ?)"
            " AND (CAST(? AS DOUBLE PRECISION) IS NULL OR"
            " (state = 'queued' AND not_before <= ?) OR"
            " (state = 'leased' AND lease_expires <= ?))"
            " ORDER BY priority, created_at, id LIMIT ? OFFSET ?",
            (state, state, model, model, *[claimable_at] * 3, limit, offset),
        )
        return [_job_of(row) for row in rows]

    def _job(self, db: Transaction, job_id: int) -> Job:
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
        with self.db.read() as tx:
            studies = tx.execute(
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
                    for r in tx.execute(
                        "SELECT DISTINCT modality FROM series WHERE study_uid = ? AND"
                        " modality IS NOT NULL ORDER BY modality",
                        (uid,),
                    )
                ]
                jobs = [
                    WorklistJob(id=i, model=m, state=JobState(s), critical=bool(c))
                    for i, m, s, c in tx.execute(
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
        rows = self._read("SELECT study_uid FROM studies WHERE deleting = 1")
        return [self._files(r[0]) for r in rows]

    def _files(self, study_uid: str) -> StudyFiles:
        with self.db.read() as tx:
            tier, deleting = tx.execute(
                "SELECT tier, deleting FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            files = dict(
                tx.execute(
                    "SELECT path, tier FROM instances WHERE study_uid = ? ORDER BY path",
                    (study_uid,),
                )
            )
        return StudyFiles(study_uid=study_uid, tier=tier, deleting=bool(deleting), files=files)

    def set_tier(self, study_uid: str, tier: str, paths: list[str]) -> None:
        with self.db.write() as db:
            db.execute("UPDATE studies SET tier = ? WHERE study_uid = ?", (tier, study_uid))
            db.executemany(
                "UPDATE instances SET tier = ? WHERE study_uid = ? AND path = ?",
                [(tier, study_uid, path) for path in paths],
            )

    def mark_deleting(self, study_uid: str) -> None:
        with self.db.write() as db:
            db.execute("UPDATE studies SET deleting = 1 WHERE study_uid = ?", (study_uid,))

    def forget_study(self, study_uid: str) -> None:
        with self.db.write() as db:
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
