"""The Celery worker's log lines in the service's format (``MPQ_LOG_FORMAT``, see
:mod:`mpq_service.logs`), with the job id on every line logged while a job runs.

Celery configures logging itself (``--loglevel``, ``--logfile``, the root logger and its task
logger); these signal handlers only swap the formatter of the handlers it made, so its options
keep working. In JSON mode the startup banner (plain text on stdout) is left out, so that every
line of the worker's output parses.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init

from mpq_service.logs import make_formatter, resolve_format

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
def _quiet_banner_in_json(instance: Any = None, **_: Any) -> None:
    if instance is not None and resolve_format(log_format_setting()) == "json":
        instance.quiet = True
