"""Thin Celery tasks: each one calls the library (:func:`worker.jobs.run_job`).

The settings, the database engine and the storage are built once per worker process, lazily on
the first task (so in the prefork pool they are built in the child after the fork, never shared
with the parent), and rebuilt if the process id changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_process_init

from mpq_service.celery_config import TASK_RUN_JOB
from mpq_service.logs import job_context

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from mpq_service.settings import Settings
    from mpq_service.storage import Storage

__all__ = ["JobTask", "resources", "run_job_task"]

log = logging.getLogger(__name__)


@dataclass
class _Resources:
    pid: int
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: Storage


_resources: _Resources | None = None


def resources() -> _Resources:
    """This process's settings, engine, session factory and storage (built on first use)."""
    global _resources
    if _resources is None or _resources.pid != os.getpid():
        from mpq_service.db import make_engine, make_sessionmaker
        from mpq_service.settings import get_settings
        from mpq_service.storage import make_storage

        settings = get_settings()
        engine = make_engine(settings.database_url)
        storage = make_storage(settings)
        storage.ensure_ready()
        _resources = _Resources(os.getpid(), settings, engine, make_sessionmaker(engine), storage)
        _log_isolation(settings.sandbox)
    return _resources


def _log_isolation(setting: str) -> None:
    from worker.sandbox import SandboxUnavailable, choose_isolation

    try:
        log.info("job sandbox: %s (MPQ_SANDBOX=%s)", choose_isolation(setting).value, setting)
    except SandboxUnavailable as exc:
        log.error("job sandbox unavailable, jobs will fail: %s", exc)


@worker_process_init.connect
def _forget_parent_resources(**_: object) -> None:
    # A forked child must not reuse the parent's connections: start from scratch.
    global _resources
    _resources = None


class JobTask(Task):
    """Records a hard time limit on the job: the child that ran it was killed, so only the
    worker's parent process (which calls ``on_failure`` then) can."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not isinstance(exc, TimeLimitExceeded):
            return  # run_job records its own failures; a lost worker is re-queued
        job_id = (list(args or []) or [(kwargs or {}).get("job_id")])[0]
        if not job_id:
            return
        from worker.jobs import fail_running_job, time_limit_message

        res = resources()
        with job_context(str(job_id)):
            log.error("job %s: hard time limit exceeded", job_id)
            fail_running_job(
                str(job_id),
                "time_limit_exceeded",
                time_limit_message(res.settings.job_time_limit_s),
                session_factory=res.session_factory,
            )


@shared_task(
    base=JobTask,
    name=TASK_RUN_JOB,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def run_job_task(job_id: str) -> None:
    """Run one attempt of job ``job_id`` (state, progress and results go to the database)."""
    from worker.jobs import run_job

    res = resources()
    run_job(
        job_id,
        settings=res.settings,
        session_factory=res.session_factory,
        storage=res.storage,
        workdir=res.settings.data_dir / "work",
    )
