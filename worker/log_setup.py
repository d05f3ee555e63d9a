"""The Celery worker's log lines in the service's format (``MPQ_LOG_FORMAT``, see
:mod:`mpq_service.logs`), with the job id on every line logged while a job runs.

Celery configures logging itself (``--loglevel``, ``--logfile``, the root logger and its task
logger); these signal handlers only swap the formatter of the handlers it made, so its options
keep working; until Celery sets logging up, :func:`mpq_service.logs.setup_logging` does. In JSON
mode the startup banner (plain text on stdout) is left out, so that the worker's output parses;
only Celery's shutdown notices (``worker: Warm shutdown (MainProcess)``), printed from its
signal handler where logging is not safe, stay plain text.

The job id is set from Celery's ``task_prerun`` to its ``task_postrun``, so Celery's own lines
about the task (``Task mpq.run_job[...] succeeded``) carry it too, besides everything
:func:`worker.jobs.run_job` logs (which sets it itself as well, for callers without Celery).
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_init,
    task_postrun,
    task_prerun,
)

from mpq_service import logs
from mpq_service.celery_config import TASK_RUN_JOB
from mpq_service.logs import make_formatter, resolve_format, setup_logging

__all__ = ["log_format_setting"]


def log_format_setting() -> str:
    """``MPQ_LOG_FORMAT`` as the settings read it; ``auto`` when the settings do not validate
    (the worker reports that itself when its first job needs them)."""
    from mpq_service.settings import get_settings

    try:
        return get_settings().log_format
    except Exception:
        return "auto"


def _use_format(logger: logging.Logger) -> None:
    formatter = make_formatter(log_format_setting())
    for handler in logger.handlers:
        handler.setFormatter(formatter)


@after_setup_logger.connect
def _format_root_logger(logger: logging.Logger, **_: Any) -> None:
    _use_format(logger)


@after_setup_task_logger.connect
def _format_task_logger(logger: logging.Logger, **_: Any) -> None:
    _use_format(logger)


@celeryd_init.connect
def _format_from_the_start(instance: Any = None, **_: Any) -> None:
    # Before Celery sets logging up, it checks its privileges and warns (as root, say): that
    # warning is a log line in our format too. Celery replaces this handler with its own soon.
    setting = log_format_setting()
    setup_logging(setting)
    if instance is not None and resolve_format(setting) == "json":
        instance.quiet = True  # no banner


_job_tokens: dict[str, contextvars.Token[str | None]] = {}


@task_prerun.connect
def _job_id_on(
    task_id: str = "", task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    if getattr(task, "name", None) != TASK_RUN_JOB:
        return
    job = (list(args or []) or [(kwargs or {}).get("job_id")])[0]
    if job:
        _job_tokens[task_id] = logs.job_id.set(str(job))


@task_postrun.connect
def _job_id_off(task_id: str = "", **_: Any) -> None:
    token = _job_tokens.pop(task_id, None)
    if token is not None:
        logs.job_id.reset(token)
