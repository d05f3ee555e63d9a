"""One job attempt, from the database row to the stored artifacts: :func:`run_job`.

No broker here: the Celery task in :mod:`worker.tasks` is a thin wrapper, and the tests call
:func:`run_job` directly. The pipeline runs in a child process, so this module never imports
torch.

Life of an attempt:

1. Claim: one conditional update takes a ``queued`` job (or a ``running`` one whose heartbeat
   is stale: a message redelivered after its worker died), increments ``attempts`` (the number
   of this attempt from now on) and marks it ``running``. Anything else is left alone: a final
   job (cancelled while queued, or a redelivered message of a finished job), or one running
   with a live heartbeat (a duplicate message: the reaper re-queued it and the broker redelivered
   it too). A job already started ``job_max_attempts`` times (it killed its worker each time) is
   failed with ``worker_lost_repeatedly``. While the attempt runs, a
   :class:`~worker.heartbeat.Heartbeat` thread stamps ``heartbeat_at``; :mod:`mpq_service.reaper`
   re-queues the job if those stop.
2. Inputs are downloaded from storage into a private temporary folder under ``workdir``,
   with a stored sensitivity table for the same tenant, model, data and analysis settings.
3. The pipeline runs in a sandboxed child process (:mod:`worker.child_job`, :mod:`worker.sandbox`):
   the uploaded model is never loaded in this process, which holds the credentials. Progress
   (stage and overall fraction) is written at most every :data:`PROGRESS_INTERVAL_S` seconds and
   at every stage change, and at least every few seconds, with a conditional update that also
   notices a cancellation (status set to ``cancelled`` by the API), a deleted job or a newer
   attempt: the child is then killed with its whole process tree.
4. Artifacts go to storage (keys from :mod:`mpq_service.storage_keys`) with Artifact rows, the
   sensitivity table into the cache, and the job is marked ``succeeded`` with a result
   summary, only if it is still running *this* attempt.

Every write of an attempt (progress, success, failure) checks the attempt number, so an attempt
presumed dead and re-queued can never overwrite its successor, and a job is recorded as done
once. The final write is retried through database errors for ``job_final_write_retry_s``; if the
database stays away longer, the job is left ``running`` without a heartbeat and the reaper
settles it. Progress writes that fail on a database error are skipped (the next one tries again).

Every failure ends the attempt with a final status: :class:`MpqError` (raised here or reported
by the child, including the sandbox's limits: ``time_limit_exceeded``,
``cpu_time_limit_exceeded``, ``memory_limit_exceeded``, ``job_crashed``) -> ``failed`` with its
code and message; Celery's soft time limit -> ``time_limit_exceeded``; anything else ->
``internal_error`` with a one-line message (the traceback goes to the log).

This module imports no torch: the worker's own process never needs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mpq_core.errors import MpqError
from mpq_core.host_memory import default_job_memory_bytes
from mpq_core.progress import STAGES
from mpq_core.spec import JobSpec
from mpq_service import storage_keys
from mpq_service.celery_config import soft_time_limit
from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.logs import job_context
from mpq_service.reaper import db_now, first_line, lost_repeatedly_message, time_limit_message
from mpq_service.stage_durations import record_stage_durations, stage_seconds
from mpq_service.storage import ObjectNotFound, Storage, StorageUnavailable, artifact_content_type
from mpq_service.tables import Artifact, Job, SensitivityCache, utcnow
from worker.child_job import ChildJob, run_child_job
from worker.heartbeat import Heartbeat
from worker.sandbox import SandboxLimits, SandboxUnavailable, choose_isolation

if TYPE_CHECKING:
    from mpq_service.settings import Settings

__all__ = [
    "PROGRESS_INTERVAL_S",
    "STAGE_WEIGHTS",
    "fail_running_job",
    "lost_repeatedly_message",
    "run_job",
    "time_limit_message",
]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
#: Share of the overall progress each pipeline stage stands for (stages not listed count 0.02).
STAGE_WEIGHTS: dict[str, float] = {
    "intake": 0.03,
    "profile": 0.04,
    "analyze": 0.30,
    "allocate": 0.02,
    "quantize": 0.08,
    "finetune": 0.40,
    "evaluate": 0.08,
    "export": 0.05,
}
_MESSAGE_MAX = 500

_T = TypeVar("_T")


class _Aborted(Exception):
    """The job was cancelled (or deleted) while running: stop and leave its status alone."""


class _Superseded(_Aborted):
    """This attempt was presumed dead and the job re-queued: a newer attempt owns the job and
    its artifact keys, so stop without touching either."""


@dataclass
class _Inputs:
    tenant_id: str
    spec: dict[str, Any]
    model_key: str
    model_sha256: str
    model_format: str
    data_key: str
    data_sha256: str
    data_format: str
    eval_key: str | None = None
    eval_format: str | None = None
    #: This attempt's number (``jobs.attempts`` once claimed); every write checks it.
    attempt: int = 0
    #: How long the final write retries through database errors.
    final_write_retry_s: float = 0.0


@dataclass
class _Progress:
    """The pipeline's progress callback: overall fraction to the database, cancellation back.

    ``attempt`` (the claimed attempt's number) makes every write conditional on this attempt
    still owning the job. A write that fails on a database error is skipped with a warning:
    progress is advisory, and :meth:`write` is also the sandbox loop's periodic check, which
    must not stall while the database is away (the child's wall-clock limit is enforced in that
    loop); the final write retries, and the reaper settles what remains.
    """

    job_id: str
    session_factory: sessionmaker[Session]
    interval_s: float = PROGRESS_INTERVAL_S
    stage: str | None = None
    overall: float = 0.0
    last_write: float = field(default=-1e9)
    writes: int = 0
    attempt: int | None = None

    def overall_fraction(self, stage: str, fraction: float) -> float:
        weights = [STAGE_WEIGHTS.get(s, 0.02) for s in STAGES]
        total = sum(weights)
        if stage not in STAGES:
            return self.overall
        i = STAGES.index(stage)
        done = sum(weights[:i]) + weights[i] * min(max(fraction, 0.0), 1.0)
        # Never 1.0 before the artifacts are stored; never backwards.
        return max(self.overall, min(done / total, 0.99))

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        self.overall = self.overall_fraction(stage, fraction)
        now = time.monotonic()
        if stage == self.stage and now - self.last_write < self.interval_s:
            return
        self.stage = stage
        self.last_write = now
        self.write()

    def write(self) -> None:
        """Store stage and progress if this attempt still runs the job, else raise
        :class:`_Aborted` (:class:`_Superseded` when a newer attempt owns it)."""
        try:
            self._write_once()
        except SQLAlchemyError as exc:
            log.warning("job %s: progress not recorded: %s", self.job_id, first_line(exc))

    def _write_once(self) -> None:
        with session_scope(self.session_factory) as session:
            mine = [Job.id == self.job_id, Job.status == JobStatus.RUNNING.value]
            if self.attempt is not None:
                mine.append(Job.attempts == self.attempt)
            result = session.execute(
                update(Job)
                .where(*mine)
                .values(stage=self.stage, progress=round(self.overall, 4), updated_at=utcnow())
            )
            rows = cast("CursorResult[Any]", result).rowcount
            if rows == 0:
                raise _stopped(session, self.job_id, self.attempt)
        self.writes += 1


def _stopped(session: Session, job_id: str, attempt: int | None) -> _Aborted:
    """Why this attempt may not write: superseded by a newer attempt, or cancelled/deleted."""
    current = session.scalar(select(Job.attempts).where(Job.id == job_id))
    if current is not None and attempt is not None and current != attempt:
        return _Superseded(job_id)
    return _Aborted(job_id)


def _transient(exc: DBAPIError) -> bool:
    """A database error worth retrying: the server or the connection went away (or SQLite's
    write lock is busy), not a bad statement."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated


def _retrying(call: Callable[[], _T], budget_s: float, what: str) -> _T:
    """``call()``, retried with exponential backoff through transient database errors for
    ``budget_s`` seconds; the last error is raised after that."""
    deadline = time.monotonic() + budget_s
    delay = 0.25
    while True:
        try:
            return call()
        except DBAPIError as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database error, retrying in %.2f s: %s", what, delay, first_line(exc))
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:_MESSAGE_MAX]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _claimable(job_id: str, now: Any, stale_after_s: float) -> Any:
    """The job may start an attempt: queued, or running with a stale heartbeat (its worker
    died and the broker redelivered its message before the reaper got to it)."""
    stale = func.coalesce(Job.heartbeat_at, Job.updated_at) < now - timedelta(seconds=stale_after_s)
    return and_(
        Job.id == job_id,
        or_(
            Job.status == JobStatus.QUEUED.value,
            and_(Job.status == JobStatus.RUNNING.value, stale),
        ),
    )


def _inputs_of(job: Job, settings: Settings) -> _Inputs:
    model, data = job.model, job.dataset
    if model is None or data is None:  # api.actions refuses that while a job is active
        raise RuntimeError(f"job {job.id}: its model or dataset was deleted before it ran")
    inputs = _Inputs(
        tenant_id=job.tenant_id,
        spec=dict(job.spec),
        model_key=model.storage_key,
        model_sha256=model.sha256,
        model_format=model.format,
        data_key=data.storage_key,
        data_sha256=data.sha256,
        data_format=data.format,
        attempt=job.attempts,
        final_write_retry_s=settings.job_final_write_retry_s,
    )
    if job.eval_dataset is not None:
        inputs.eval_key = job.eval_dataset.storage_key
        inputs.eval_format = job.eval_dataset.format
    return inputs


def _not_claimed(session: Session, job_id: str, settings: Settings, claimable: Any) -> None:
    """Say why ``job_id`` was not claimed; fail it if it used up its attempts."""
    job = session.scalars(select(Job).where(Job.id == job_id)).first()
    if job is None:
        log.warning("job %s: not found (deleted?), nothing to do", job_id)
    elif JobStatus(job.status).is_final:
        log.info("job %s: already %s, nothing to do", job_id, job.status)
    elif job.attempts >= settings.job_max_attempts:
        message = lost_repeatedly_message(job.attempts)
        session.execute(
            update(Job)
            .where(claimable)
            .values(
                status=JobStatus.FAILED.value,
                error_code="worker_lost_repeatedly",
                error_message=message,
                finished_at=utcnow(),
                heartbeat_at=None,
            )
        )
        log.error("job %s: %s", job_id, message)
    else:
        log.info(
            "job %s: attempt %d is running with a live heartbeat; duplicate message ignored",
            job_id,
            job.attempts,
        )


def _claim(job_id: str, settings: Settings, factory: sessionmaker[Session]) -> _Inputs | None:
    """Start an attempt: the job's inputs, or None when this attempt must not run.

    One conditional UPDATE decides, so two workers handed the same job (a duplicate message)
    cannot both claim it, on Postgres or SQLite.
    """
    with session_scope(factory) as session:
        now = db_now(session)
        claimable = _claimable(job_id, now, settings.job_stale_after_s)
        result = session.execute(
            update(Job)
            .where(claimable, Job.attempts < settings.job_max_attempts)
            .values(
                attempts=Job.attempts + 1,
                status=JobStatus.RUNNING.value,
                started_at=now,
                heartbeat_at=now,
                stage=None,
                progress=0.0,
                error_code=None,
                error_message=None,
                updated_at=now,
            )
        )
        if cast("CursorResult[Any]", result).rowcount != 1:
            _not_claimed(session, job_id, settings, claimable)
            return None
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        log.info("job %s: attempt %d started", job_id, job.attempts)
        return _inputs_of(job, settings)


def _finish_failed(
    factory: sessionmaker[Session],
    job_id: str,
    code: str,
    message: str,
    *,
    attempt: int | None = None,
    retry_s: float = 0.0,
) -> None:
    """Mark the job failed, unless it is no longer running (cancelled or deleted meanwhile) or,
    given ``attempt``, no longer running that attempt. Retried through database errors."""

    def write() -> None:
        with session_scope(factory) as session:
            mine = [Job.id == job_id, Job.status == JobStatus.RUNNING.value]
            if attempt is not None:
                mine.append(Job.attempts == attempt)
            session.execute(
                update(Job)
                .where(*mine)
                .values(
                    status=JobStatus.FAILED.value,
                    error_code=code,
                    error_message=message,
                    finished_at=utcnow(),
                    updated_at=utcnow(),
                    heartbeat_at=None,
                )
            )

    _retrying(write, retry_s, f"job {job_id}: final write")


def fail_running_job(
    job_id: str, code: str, message: str, *, session_factory: sessionmaker[Session]
) -> None:
    """Mark a running job failed from outside its attempt, e.g. by the Celery parent process
    after the hard time limit killed the child that ran it (the attempt could record nothing)."""
    _finish_failed(session_factory, job_id, code, message)


def _cache_row(session: Session, tenant_id: str, key: str) -> SensitivityCache | None:
    return session.scalars(
        select(SensitivityCache).where(
            SensitivityCache.tenant_id == tenant_id, SensitivityCache.key == key
        )
    ).first()


def _cached_table(
    factory: sessionmaker[Session], storage: Storage, tenant_id: str, key: str, dest: Path
) -> bool:
    """Download the stored sensitivity table for ``key`` to ``dest``; False when there is none.
    The child parses it (and recomputes when it is unusable)."""
    try:
        with session_scope(factory) as session:
            row = _cache_row(session, tenant_id, key)
            storage_key = row.storage_key if row is not None else None
    except SQLAlchemyError as exc:  # a cache: a database blip costs a recomputation, not the job
        log.warning("sensitivity cache %s not readable (%s); computing", key, first_line(exc))
        return False
    if storage_key is None:
        return False
    try:
        storage.get_file(storage_key, dest)
        return True
    except ObjectNotFound:
        log.warning("sensitivity cache %s: its object is gone; recomputing", key)
        return False


def _store_table(
    factory: sessionmaker[Session], storage: Storage, tenant_id: str, key: str, path: Path
) -> None:
    storage_key = storage_keys.sensitivity_key(tenant_id, key)
    storage.put_file(storage_key, path)
    try:
        with session_scope(factory) as session:
            row = _cache_row(session, tenant_id, key)
            if row is None:
                session.add(SensitivityCache(tenant_id=tenant_id, key=key, storage_key=storage_key))
            else:
                row.storage_key = storage_key
    except IntegrityError:
        # Another job stored the same table at the same moment: theirs is as good as ours.
        log.info("sensitivity cache %s: stored concurrently by another job", key)
    except SQLAlchemyError as exc:  # a cache: the job's own result does not depend on it
        log.warning("sensitivity cache %s not recorded: %s", key, first_line(exc))


def _summary(
    report: Mapping[str, Any], *, reused: bool, key: str, seconds: dict[str, float]
) -> dict[str, Any]:
    return {
        "budgets": report.get("budgets"),
        "predicted_loss_increase": report.get("predicted_loss_increase"),
        "measured_loss_increase": report.get("measured_loss_increase"),
        "metrics": report.get("metrics"),
        "sizes": report.get("sizes"),
        "timings": report.get("timings"),
        "worker_timings": seconds,
        "allocation": report.get("allocation"),
        "model": report.get("model"),
        "data": report.get("data"),
        "sensitivity": {"key": key, "reused": reused},
        "device": report.get("device", "cpu"),
        "artifacts": report.get("artifacts"),
    }


def run_job(
    job_id: str,
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
    workdir: str | Path,
) -> None:
    """Run one attempt of job ``job_id`` and leave it in a final state (or untouched when it is
    final already). Never raises for a problem of the job itself: those are recorded on the job.

    Args:
        job_id: the Job row's id.
        settings: the service settings (attempt cap, heartbeat, stale and retry times, limit).
        session_factory: sessions on the service database.
        storage: where uploads are read from and artifacts written to.
        workdir: a folder for the attempt's temporary files (removed afterwards).
    """
    with job_context(job_id):  # every line logged meanwhile carries the job id
        inputs = _claim(job_id, settings, session_factory)
        if inputs is None:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        with Heartbeat(session_factory, job_id, inputs.attempt, settings.job_heartbeat_interval_s):
            _run_claimed(job_id, inputs, settings, session_factory, storage, workdir)


def _run_claimed(
    job_id: str,
    inputs: _Inputs,
    settings: Settings,
    factory: sessionmaker[Session],
    storage: Storage,
    workdir: Path,
) -> None:
    """The claimed attempt, ended with a final write (or left to the reaper, see below)."""
    uploaded: list[str] = []
    try:
        with tempfile.TemporaryDirectory(dir=workdir, prefix=f"job-{job_id}-") as tmp_name:
            _attempt(job_id, inputs, factory, storage, Path(tmp_name), uploaded, settings)
        return
    except _Superseded:
        # The artifact keys now belong to the newer attempt: delete nothing.
        log.warning(
            "job %s: attempt %d was superseded by a newer one; stopped", job_id, inputs.attempt
        )
        return
    except _Aborted:
        log.info("job %s: stopped: cancelled, deleted or failed by the reaper meanwhile", job_id)
        _delete(storage, uploaded)
        return
    except SandboxUnavailable as exc:
        log.error("job %s: %s", job_id, exc)
        code, message = "sandbox_unavailable", str(exc)
    except MpqError as exc:
        log.info("job %s: failed: %s", job_id, exc)
        code, message = exc.code, exc.message
    except DBAPIError as exc:
        if not _transient(exc):
            raise
        # The database stayed away past the retries: the job is neither failed nor done. Its
        # heartbeat stops with this attempt and the reaper re-queues it. The uploads stay: a
        # success write whose commit went through unacknowledged may point at them.
        log.error("job %s: database unreachable, left to the reaper: %s", job_id, first_line(exc))
        return
    except StorageUnavailable as exc:
        # Each storage call was already retried with backoff (MPQ_S3_MAX_ATTEMPTS).
        log.error("job %s: storage unavailable: %s", job_id, first_line(exc))
        code = "storage_unavailable"
        message = (
            "the service's storage was unreachable during the job; submit it again "
            f"({first_line(exc)[:300]})"
        )
    except Exception as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            log.error("job %s: time limit exceeded", job_id)
            code, message = "time_limit_exceeded", time_limit_message(settings.job_time_limit_s)
        else:
            log.exception("job %s: internal error", job_id)
            code, message = "internal_error", _one_line(exc)
    _delete(storage, uploaded)
    _finish_or_leave(factory, job_id, code, message, inputs)


def _finish_or_leave(
    factory: sessionmaker[Session], job_id: str, code: str, message: str, inputs: _Inputs
) -> None:
    try:
        _finish_failed(
            factory,
            job_id,
            code,
            message,
            attempt=inputs.attempt,
            retry_s=inputs.final_write_retry_s,
        )
    except SQLAlchemyError as exc:
        log.error("job %s: failure not recorded, left to the reaper: %s", job_id, first_line(exc))


def _record_success(
    factory: sessionmaker[Session],
    job_id: str,
    inputs: _Inputs,
    rows: list[Artifact],
    summary: dict[str, Any],
    sensitivity_key: str,
) -> None:
    """The final write of a successful attempt: artifact rows, result, ``succeeded``; only if
    this attempt still runs the job (else :class:`_Aborted` / :class:`_Superseded`), retried
    through database errors for ``inputs.final_write_retry_s``."""

    def write() -> None:
        with session_scope(factory) as session:
            job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            if job is not None and (job.attempts, job.status) == (
                inputs.attempt,
                JobStatus.SUCCEEDED.value,
            ):
                return  # an earlier try committed; only its answer was lost
            if job is not None and job.attempts != inputs.attempt:
                raise _Superseded(job_id)  # first: a newer attempt may have finished already
            if job is None or job.status != JobStatus.RUNNING.value:
                raise _Aborted(job_id)
            for old in list(job.artifacts):  # none unless an earlier attempt got this far
                session.delete(old)
            session.flush()
            session.add_all(_fresh(rows))
            job.result = summary
            job.sensitivity_key = sensitivity_key
            job.progress = 1.0
            job.status = JobStatus.SUCCEEDED.value
            job.finished_at = utcnow()
            job.heartbeat_at = None
            record_stage_durations(session, stage_seconds(summary))

    _retrying(write, inputs.final_write_retry_s, f"job {job_id}: final write")


def _fresh(rows: list[Artifact]) -> list[Artifact]:
    """New row objects with the same values: a retried transaction must not reuse objects that a
    rolled-back one already flushed."""
    return [
        Artifact(
            job_id=r.job_id,
            tenant_id=r.tenant_id,
            name=r.name,
            size=r.size,
            sha256=r.sha256,
            storage_key=r.storage_key,
            content_type=r.content_type,
        )
        for r in rows
    ]


def _delete(storage: Storage, keys: list[str]) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except Exception:  # best effort: the job's outcome is already decided
            log.warning("could not delete %s", key, exc_info=True)


def _download(storage: Storage, key: str, dest: Path, what: str) -> None:
    try:
        storage.get_file(key, dest)
    except ObjectNotFound:
        raise MpqError(
            f"the job's {what} is no longer in storage (deleted?); upload it again",
            code="input_missing",
        ) from None


def _store_artifacts(
    storage: Storage,
    tenant_id: str,
    job_id: str,
    artifacts: Mapping[str, Path],
    uploaded: list[str],
) -> list[Artifact]:
    """Upload the job's output files (each key also goes to ``uploaded`` as soon as it is
    stored) and return their rows, not yet added to a session."""
    rows: list[Artifact] = []
    for name, path in sorted(artifacts.items()):
        object_key = storage_keys.artifact_key(tenant_id, job_id, name)
        size = storage.put_file(object_key, path)
        uploaded.append(object_key)
        rows.append(
            Artifact(
                job_id=job_id,
                tenant_id=tenant_id,
                name=name,
                size=size,
                sha256=_sha256(path),
                storage_key=object_key,
                content_type=artifact_content_type(path.name),
            )
        )
    return rows


def _limits(settings: Settings, elapsed_s: float) -> SandboxLimits:
    """The child's limits: the wall clock ends before Celery's soft limit would fire."""
    wall = soft_time_limit(settings.job_time_limit_s) - elapsed_s - 1.0
    memory = settings.sandbox_memory_bytes or default_job_memory_bytes()
    cpu = settings.sandbox_cpu_seconds or settings.job_time_limit_s * (os.cpu_count() or 1)
    return SandboxLimits(
        wall_seconds=max(1.0, wall),
        memory_bytes=memory,
        cpu_seconds=cpu,
        file_bytes=4 * settings.max_upload_bytes,
    )


def _download_inputs(
    inputs: _Inputs,
    factory: sessionmaker[Session],
    storage: Storage,
    folder: Path,
    key: str,
    max_upload_bytes: int,
) -> ChildJob:
    folder.mkdir(parents=True)
    _download(storage, inputs.model_key, folder / "model.bin", "model")
    _download(storage, inputs.data_key, folder / f"data.{inputs.data_format}", "data set")
    eval_name = None
    if inputs.eval_key is not None:
        eval_name = f"eval.{inputs.eval_format}"
        _download(storage, inputs.eval_key, folder / eval_name, "evaluation data set")
    cached = _cached_table(factory, storage, inputs.tenant_id, key, folder / "sensitivity.json")
    return ChildJob(
        spec=inputs.spec,
        model="model.bin",
        data=f"data.{inputs.data_format}",
        eval=eval_name,
        sensitivity="sensitivity.json" if cached else None,
        max_upload_bytes=max_upload_bytes,
    )


def _attempt(
    job_id: str,
    inputs: _Inputs,
    factory: sessionmaker[Session],
    storage: Storage,
    tmp: Path,
    uploaded: list[str],
    settings: Settings,
) -> None:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    spec = JobSpec.from_dict(inputs.spec)
    progress = _Progress(job_id, factory, attempt=inputs.attempt)
    progress("intake", 0.0, {})  # also notices a cancellation that came in meanwhile
    isolation = choose_isolation(settings.sandbox)

    key = SensitivityCache.make_key(
        inputs.model_sha256,
        inputs.data_sha256,
        spec.sensitivity_settings(has_eval_data=inputs.eval_key is not None),
    )
    child_job = _download_inputs(
        inputs, factory, storage, tmp / "input", key, settings.max_upload_bytes
    )
    seconds["download"] = round(time.perf_counter() - start, 4)

    t0 = time.perf_counter()
    result = run_child_job(
        child_job,
        tmp,
        limits=_limits(settings, time.perf_counter() - start),
        isolation=isolation,
        on_progress=lambda stage, fraction: progress(stage, fraction, {}),
        tick=progress.write,
    )
    seconds["pipeline"] = round(time.perf_counter() - t0, 4)
    progress.write()  # cancelled during the last stage? then nothing is uploaded

    t0 = time.perf_counter()
    rows = _store_artifacts(storage, inputs.tenant_id, job_id, result.artifacts, uploaded)
    if child_job.sensitivity is None and result.table is not None:
        _store_table(factory, storage, inputs.tenant_id, key, result.table)
    seconds["upload"] = round(time.perf_counter() - t0, 4)
    seconds["total"] = round(time.perf_counter() - start, 4)

    summary = _summary(
        result.report, reused=child_job.sensitivity is not None, key=key, seconds=seconds
    )
    summary["sandbox"] = {
        "isolation": isolation.value,
        "cpu_seconds": result.outcome.cpu_seconds,
    }
    _record_success(factory, job_id, inputs, rows, summary, key)
    log.info("job %s: succeeded in %.1f s", job_id, seconds["total"])
