"""The reaper: running jobs whose worker died are re-queued, or failed after the attempt cap.

A running attempt stamps ``jobs.heartbeat_at`` every ``job_heartbeat_interval_s``
(:mod:`worker.heartbeat`). :func:`reap` finds ``running`` jobs whose heartbeat is older than
``job_stale_after_s`` (rows without one fall back to ``updated_at``) and settles each one:

- started fewer than ``job_max_attempts`` times: status back to ``queued`` and a new message to
  the broker, in one transaction (a broker that refuses the message rolls the re-queue back; the
  next pass tries again);
- otherwise: ``failed`` with ``worker_lost_repeatedly``.

It also fails, with ``time_limit_exceeded``, a running job whose attempt started more than
``job_time_limit_s + job_stale_after_s`` ago: a backstop for whatever was meant to stop it (the
sandbox's wall-clock limit, Celery's limits, which the embedded solo pool does not have). The
attempt notices at its next progress write and stops.

Several reapers at once are safe: every change is one conditional ``UPDATE`` that re-checks the
status, the attempt number and the staleness (a row lock on Postgres, the write lock on SQLite),
so exactly one reaper (or one worker's claim) wins and the others change nothing. A duplicate
message is harmless: a claim only takes a ``queued`` job or a ``running`` one whose heartbeat is
stale, and the attempt number in every write of an attempt keeps a superseded attempt from
recording anything.

Where reapers run: a :class:`Reaper` thread in every Celery worker's main process (see
:mod:`worker.lifecycle`): wherever jobs can run, orphans are looked for, with no extra service to
deploy (and when no worker is left, nothing could run a re-queued job anyway). ``mpq serve``
calls :func:`recover_on_start` before it starts (or restarts) its worker. This module lives in
the service core, not in ``worker``, because ``mpq serve`` (the API side) uses it too; it never
imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.periodic import Periodic
from mpq_service.tables import Job, utcnow

if TYPE_CHECKING:
    from mpq_service.settings import Settings

__all__ = [
    "Enqueue",
    "Reaped",
    "Reaper",
    "db_now",
    "first_line",
    "lost_repeatedly_message",
    "reap",
    "recover_on_start",
    "time_limit_message",
]

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]
"""Hands a job id to the workers (a new broker message); raises if the broker cannot take it."""

_BATCH = 100
_RUNNING = JobStatus.RUNNING.value


@dataclass
class Reaped:
    """What one pass changed (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.timed_out)

    def merge(self, other: Reaped) -> Reaped:
        return Reaped(
            self.requeued + other.requeued,
            self.failed + other.failed,
            self.timed_out + other.timed_out,
        )


def db_now(session: Session) -> datetime:
    """The database server's current time, timezone-aware UTC.

    Heartbeats are stamped and compared with it: Postgres answers with its own clock (one clock
    for every worker machine, whatever theirs say); SQLite is a file on this machine, so this
    machine's clock is the database's.
    """
    if session.get_bind().dialect.name == "sqlite":
        return utcnow()
    return cast("datetime", session.execute(select(func.now())).scalar_one())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (driver errors run to many lines)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def lost_repeatedly_message(attempts: int) -> str:
    """The error message of a job failed with ``worker_lost_repeatedly``."""
    return (
        f"the job was started {attempts} time(s) and its worker stopped each time "
        f"(crash, out of memory or killed) before it finished; it is not retried again"
    )


def time_limit_message(limit_s: int) -> str:
    """The error message of a job stopped by its time limit."""
    return f"the job ran past its time limit of {limit_s} s and was stopped"


def _last_sign_of_life() -> ColumnElement[Any]:
    return func.coalesce(Job.heartbeat_at, Job.updated_at)


def _settle(
    factory: sessionmaker[Session], settings: Settings, enqueue: Enqueue, job_id: str, attempt: int,
    stale_after_s: float,
) -> str | None:  # fmt: skip
    """Re-queue or fail one stale job; what was done, or None when another reaper (or a claim,
    or a late heartbeat) got there first."""
    with session_scope(factory) as session:
        now = db_now(session)
        still_stale = and_(
            Job.id == job_id,
            Job.status == _RUNNING,
            Job.attempts == attempt,
            _last_sign_of_life() < now - timedelta(seconds=stale_after_s),
        )
        if attempt >= settings.job_max_attempts:
            values: dict[str, Any] = {
                "status": JobStatus.FAILED.value,
                "error_code": "worker_lost_repeatedly",
                "error_message": lost_repeatedly_message(attempt),
                "finished_at": now,
            }
        else:
            values = {"status": JobStatus.QUEUED.value, "stage": None, "progress": 0.0}
        result = session.execute(update(Job).where(still_stale).values(heartbeat_at=None, **values))
        if cast("CursorResult[Any]", result).rowcount != 1:
            return None
        if values["status"] == JobStatus.QUEUED.value:
            # Inside the transaction: if the broker refuses, the job stays running and stale.
            enqueue(job_id)
        return values["status"]


def _time_out(
    factory: sessionmaker[Session], settings: Settings, stale_after_s: float
) -> list[str]:
    """Fail the running jobs whose attempt outlived its time limit by ``stale_after_s``."""
    limit = timedelta(seconds=settings.job_time_limit_s + stale_after_s)
    with session_scope(factory) as session:
        now = db_now(session)
        over = and_(Job.status == _RUNNING, Job.started_at < now - limit)
        ids = list(session.scalars(select(Job.id).where(over).limit(_BATCH)))
        if ids:
            session.execute(
                update(Job)
                .where(over, Job.id.in_(ids))
                .values(
                    status=JobStatus.FAILED.value,
                    error_code="time_limit_exceeded",
                    error_message=time_limit_message(settings.job_time_limit_s),
                    finished_at=now,
                    heartbeat_at=None,
                )
            )
    for job_id in ids:
        log.error("job %s: still running past its time limit; failed", job_id)
    return ids


def reap(
    settings: Settings,
    factory: sessionmaker[Session],
    enqueue: Enqueue,
    *,
    stale_after_s: float | None = None,
) -> Reaped:
    """One pass: settle every running job with a stale heartbeat (see the module docstring).

    Args:
        stale_after_s: overrides ``settings.job_stale_after_s`` (``mpq serve`` uses a shorter
            one at start, when its own worker is known to be gone).
    """
    stale_s = settings.job_stale_after_s if stale_after_s is None else stale_after_s
    done = Reaped(timed_out=_time_out(factory, settings, settings.job_stale_after_s))
    with session_scope(factory) as session:
        cutoff = db_now(session) - timedelta(seconds=stale_s)
        rows = session.execute(
            select(Job.id, Job.attempts)
            .where(Job.status == _RUNNING, _last_sign_of_life() < cutoff)
            .order_by(Job.created_at)
            .limit(_BATCH)
        ).all()
    for job_id, attempt in rows:
        try:
            outcome = _settle(factory, settings, enqueue, job_id, attempt, stale_s)
        except Exception as exc:  # a broker or database error: leave it for the next pass
            log.warning("job %s: could not re-queue it yet: %s", job_id, first_line(exc))
            continue
        if outcome == JobStatus.QUEUED.value:
            log.warning(
                "job %s: attempt %d lost its worker (no heartbeat); re-queued", job_id, attempt
            )
            done.requeued.append(job_id)
        elif outcome == JobStatus.FAILED.value:
            log.error("job %s: %s", job_id, lost_repeatedly_message(attempt))
            done.failed.append(job_id)
    return done


def _requeue_waiting(factory: sessionmaker[Session], enqueue: Enqueue, skip: set[str]) -> list[str]:
    """A new message for every ``queued`` job (the filesystem broker deletes a message when a
    worker reads it, so a queued job may have none left; a duplicate is ignored by the claim)."""
    with session_scope(factory) as session:
        ids = list(
            session.scalars(
                select(Job.id).where(Job.status == JobStatus.QUEUED.value).order_by(Job.created_at)
            )
        )
    sent = []
    for job_id in ids:
        if job_id not in skip:
            enqueue(job_id)
            sent.append(job_id)
    return sent


def recover_on_start(
    settings: Settings,
    factory: sessionmaker[Session],
    enqueue: Enqueue,
    *,
    sleep: Callable[[float], object] = time.sleep,
) -> Reaped:
    """What ``mpq serve`` does before it starts its worker: jobs left ``running`` by a worker
    that was killed or stopped are re-queued (or failed after the attempt cap) and every
    ``queued`` job gets a message again.

    A job whose heartbeat is younger than three heartbeat intervals may still be running in a
    worker that outlived the last ``mpq serve`` (it finishes its job before it exits): such jobs
    are looked at again once their heartbeat would have gone stale, and left alone if it has not.
    """
    short = 3 * settings.job_heartbeat_interval_s
    done = reap(settings, factory, enqueue, stale_after_s=short)
    with session_scope(factory) as session:
        young = session.scalar(select(func.count()).where(Job.status == _RUNNING))
    if young:
        sleep(short + 0.5)
        done = done.merge(reap(settings, factory, enqueue, stale_after_s=short))
    sent = _requeue_waiting(factory, enqueue, skip=set(done.requeued))
    if sent:
        log.info("re-sent %d queued job(s) to the worker", len(sent))
    return done


class Reaper(Periodic):
    """Calls :func:`reap` every ``settings.reaper_interval_s`` from a daemon thread.

    Example:
        >>> reaper = Reaper(settings, factory, enqueue).start()
        >>> reaper.stop()
    """

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], enqueue: Enqueue
    ) -> None:
        super().__init__(settings.reaper_interval_s, "mpq-reaper")
        self.settings = settings
        self.factory = factory
        self.enqueue = enqueue
        self.passes = 0

    def run_once(self) -> Reaped:
        """One pass; database and broker errors are logged and leave everything for the next."""
        try:
            return reap(self.settings, self.factory, self.enqueue)
        except SQLAlchemyError as exc:
            log.warning("reaper: database not reachable: %s", first_line(exc))
            return Reaped()
        finally:
            self.passes += 1
