"""The heartbeat of a running attempt: a daemon thread stamping ``jobs.heartbeat_at``.

:class:`Heartbeat` runs beside an attempt in the process that holds it (the Celery task's
process; the sandboxed child that runs the model holds no database credentials). Each beat is a
conditional update on the job id, the attempt number and status ``running``: when it matches no
row, the attempt is no longer the job's current one (cancelled, deleted, or presumed dead and
re-queued by :mod:`mpq_service.reaper`) and :attr:`Heartbeat.lost` is set. A beat that fails (database
unreachable) is logged and retried at the next interval; the reaper's stale limit decides how long
an attempt may go without one.

Times come from the database's clock (:func:`mpq_service.reaper.db_now`), not the worker's, so workers on machines
whose clocks disagree still compare heartbeats correctly.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.logs import job_context
from mpq_service.reaper import db_now, first_line
from mpq_service.tables import Job

__all__ = ["Heartbeat", "beat"]

log = logging.getLogger(__name__)


def beat(factory: sessionmaker[Session], job_id: str, attempt: int) -> bool:
    """Stamp the heartbeat of attempt ``attempt`` of job ``job_id``; False when that attempt is
    no longer the job's running one (nothing is written then)."""
    with session_scope(factory) as session:
        now = db_now(session)
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING.value)
            # updated_at keeps meaning "the job changed", not "the job is alive".
            .values(heartbeat_at=now, updated_at=Job.updated_at)
        )
        return cast("CursorResult[Any]", result).rowcount == 1


class Heartbeat:
    """Beats every ``interval_s`` seconds from a daemon thread while the ``with`` block runs.

    Example:
        >>> with Heartbeat(factory, job_id, attempt=2, interval_s=5.0) as heartbeat:
        ...     run_the_attempt(stop_if=heartbeat.lost.is_set)
    """

    def __init__(
        self, factory: sessionmaker[Session], job_id: str, attempt: int, interval_s: float
    ) -> None:
        self.factory = factory
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        #: Set once a beat finds the attempt superseded, cancelled or deleted.
        self.lost = threading.Event()
        self.beats = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run_for_job, name=f"heartbeat-{job_id[:8]}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop beating (returns once the thread is done, or after one interval at most)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 30.0)

    def _run_for_job(self) -> None:
        with job_context(self.job_id):  # a thread does not inherit the attempt's context
            self._run()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                alive = beat(self.factory, self.job_id, self.attempt)
            except SQLAlchemyError as exc:
                # The database is away: keep trying; the reaper waits job_stale_after_s.
                self.failures += 1
                log.warning("job %s: heartbeat failed: %s", self.job_id, first_line(exc))
                continue
            self.beats += 1
            if not alive:
                log.warning(
                    "job %s: attempt %d is no longer the running attempt (cancelled, deleted "
                    "or re-queued); heartbeat stopped",
                    self.job_id,
                    self.attempt,
                )
                self.lost.set()
                return
