"""What happens to studies and jobs over time: completion and routing, the job service
workers call, and the hot -> warm -> cold -> deleted lifecycle. Plain synchronous code over the
catalog; the server runs it off the event loop."""

from __future__ import annotations

import logging
import time
from pathlib import PurePosixPath

from telerad.api.config import GatewayConfig, ModelRoute, backoff
from telerad.api.jobs import Finding, Job, ResultRef
from telerad.runtime import phi
from telerad.runtime.gateway import outbox
from telerad.runtime.gateway.deid import Deidentifier
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.routing import route
from telerad.runtime.store.catalog import Catalog, StudyFiles
from telerad.runtime.store.files import study_dir
from telerad.runtime.store.tier import Tier

log = logging.getLogger(__name__)
DAY = 86400.0


class Flow:
    def __init__(
        self,
        config: GatewayConfig,
        catalog: Catalog,
        tiers: dict[str, Tier],
        metrics: GatewayMetrics,
        *,
        deid: Deidentifier,
    ) -> None:
        self.config = config
        self.deid = deid
        self.catalog = catalog
        self.tiers = tiers
        """The site's tiers by name, hot first, in the order studies pass through them."""
        self.metrics = metrics
        self._models: dict[str, ModelRoute] = {
            m.name: m for rule in config.routing for m in rule.models
        }

    @property
    def models(self) -> list[str]:
        return sorted(self._models)

    # -- completion --------------------------------------------------------------
    def complete_due(self, now: float) -> int:
        """Complete every study quiet for `completion.quietSeconds` (or that reached the
        count its data announced) and queue the jobs its rules call for."""
        done = 0
        quiet_before = now - self.config.completion.quiet_seconds
        for study_uid in self.catalog.due_studies(quiet_before):
            summary = self.catalog.summary(study_uid)
            decision = route(self.config.routing, summary)
            result = self.catalog.complete_study(
                study_uid, summary.round, decision.jobs, now, self.config.jobs.max_attempts
            )
            if result is None:
                continue  # an instance arrived meanwhile: the next pass sees the whole study
            done += 1
            self.metrics.completed.inc()
            self.metrics.stage("complete", now - result.first_received)
            for job in result.jobs:
                self.metrics.job_created(job.model, job.priority)
            rule = f"{decision.rule.policy}/{decision.rule.name}" if decision.rule else "none"
            log.info(
                "study %s complete (%d instances): rule %s, %d jobs",
                phi.ref(study_uid),
                summary.instances,
                rule,
                len(result.jobs),
            )
            for model in decision.refused:
                self.metrics.rejection("outside-intended-use")
                log.warning(
                    "study %s not sent to %s: outside the model's intended use",
                    phi.ref(study_uid),
                    model,
                )
        return done

    def resume(self, now: float) -> None:
        """At start: every study still receiving waits a whole quiet window from now. Its
        quiet time may have passed while the gateway was down, when its sender could not
        send: completed at once, half a study would be routed and read."""
        renewed = self.catalog.renew_quiet(now)
        if renewed:
            log.info("%d studies still receiving: their quiet time starts again", renewed)

    # -- jobs --------------------------------------------------------------------
    def claim(self, model: str, owner: str, lease_seconds: int) -> Job | None:
        job = self.catalog.claim(model, owner, lease_seconds, time.time())
        if job is None:
            return None
        if job.attempts == 1:
            self.metrics.stage("queued", time.time() - job.created_at.timestamp())
        return job.model_copy(update={"replaces": self._replaced(job)})

    def _replaced(self, job: Job) -> list[ResultRef]:
        """What the job's result replaces, named as the job sees its study."""
        refs = []
        for result in self.catalog.replaced_results(job.id):
            uids = {
                "StudyInstanceUID": result.study_uid,
                "SeriesInstanceUID": result.series_uid,
                "SOPInstanceUID": result.sop_uid,
            }
            if job.deidentify:
                uids = self.deid.pseudonymize(job.study_uid, uids)
            refs.append(
                ResultRef(
                    study_uid=uids["StudyInstanceUID"],
                    series_uid=uids["SeriesInstanceUID"],
                    sop_uid=uids["SOPInstanceUID"],
                    sop_class_uid=result.sop_class_uid,
                )
            )
        return refs

    def extend(self, job_id: int, token: str, lease_seconds: int) -> Job:
        return self.catalog.extend(job_id, token, lease_seconds, time.time())

    def complete(self, job_id: int, token: str, findings: list[Finding], base_url: str) -> Job:
        """Complete a job; `base_url` is where its alerts say the gateway is reached (the
        configured public URL, else the one the worker reached it at)."""
        current = self.catalog.job(job_id)
        model = self._models.get(current.model)
        critical = any(f.critical or self._over_threshold(model, f) for f in findings)
        done = current.model_copy(update={"critical": critical, "findings": findings})
        now = time.time()
        job = self.catalog.complete_job(
            job_id,
            token,
            findings,
            critical,
            now,
            deliveries=outbox.plan(self.config, done, base_url),
        )
        self.metrics.stage("result", now - job.created_at.timestamp())
        if critical:
            log.warning("critical finding on study %s by %s", phi.ref(job.study_uid), job.model)
        return job

    @staticmethod
    def _over_threshold(model: ModelRoute | None, finding: Finding) -> bool:
        if model is None:
            return False
        return model.thresholds.critical_at(finding.label, finding.score)

    def fail(self, job_id: int, token: str, reason: str, retryable: bool) -> Job:
        now = time.time()
        policy = self.config.jobs
        retry_at = None
        if retryable:
            attempts = self.catalog.job(job_id).attempts
            delay = backoff(policy, attempts)
            retry_at = now + delay
        job = self.catalog.fail_job(job_id, token, reason, retry_at, now)
        if job.state == "parked":
            log.warning("job %d (%s) parked after %d attempts", job.id, job.model, job.attempts)
        return job

    # -- lifecycle ---------------------------------------------------------------
    def lifecycle(self, now: float) -> None:
        """One pass; every step can be cut short by a crash and redone by the next pass."""
        storage = self.config.storage
        for study in self.catalog.deleting_studies():
            self._delete(study)
        expired_before = now - storage.retention_days * DAY
        for tier in self.tiers:
            for study in self.catalog.lifecycle_candidates(tier, expired_before, 1000):
                self.catalog.mark_deleting(study.study_uid)
                self._delete(study)
        # The oldest tier first, so that a study due for two moves makes one per pass.
        for source in reversed(self.tiers):
            move = storage.moves_on(source)
            if move is None:
                continue
            target, age = move
            for study in self.catalog.lifecycle_candidates(source, now - age * DAY, 1000):
                self._move(study, target)

    def _delete(self, study: StudyFiles) -> None:
        for tier in self.tiers.values():
            tier.remove_tree(study_dir(study.study_uid))
        self.catalog.forget_study(study.study_uid)
        self.metrics.lifecycle("deleted")
        log.info("study %s deleted after retention", phi.ref(study.study_uid))

    def _move(self, study: StudyFiles, target: str) -> None:
        # Copy (durably) first, switch the catalog, then free the old copies: a crash in
        # between leaves two good copies, never none. Each file is read from the tier
        # the catalog has it on (one that arrived after the study moved on is still hot);
        # one that arrives meanwhile is not listed, and stays where it landed.
        moving = {path: tier for path, tier in study.files.items() if tier != target}
        to = self.tiers[target]
        for path, tier in moving.items():
            relative = PurePosixPath(path)
            to.write(relative, self.tiers[tier].chunks(relative))
        self.catalog.set_tier(study.study_uid, target, list(moving))
        for path, tier in moving.items():
            self.tiers[tier].remove(PurePosixPath(path))
        for tier in set(moving.values()):
            self.tiers[tier].prune(study_dir(study.study_uid))
        self.metrics.lifecycle(target)
        log.info("study %s moved to the %s tier", phi.ref(study.study_uid), target)
