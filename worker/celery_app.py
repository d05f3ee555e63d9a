"""The workers' Celery app: ``celery -A worker.celery_app worker`` finds :data:`app`.

The app is :func:`mpq_service.celery_config.make_celery` (the configuration the API sends tasks
with) plus this package's task module, :mod:`worker.tasks`. It is built lazily on first access
(module ``__getattr__``) from the environment, so importing this module reads no settings,
creates no folders and imports no torch. ``mpq serve`` starts its worker as a ``celery -A
worker.celery_app`` subprocess too. Importing it connects :mod:`worker.lifecycle`'s signal
handlers (each worker runs a reaper thread) and :mod:`worker.log_setup`'s (its log format).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from mpq_service.celery_config import make_celery
from worker import (
    lifecycle,  # noqa: F401  (connects the reaper and parent-watch signal handlers)
    log_setup,  # noqa: F401  (connects the log-format signal handlers)
)
from worker.liveness import CONF_KEY, AliveFile, alive_path

if TYPE_CHECKING:
    from mpq_service.settings import Settings

__all__ = ["TASK_MODULES", "get_app", "make_worker_celery"]

#: Modules a worker imports at start, registering their tasks.
TASK_MODULES = ("worker.tasks",)

_app: Celery | None = None


def make_worker_celery(settings: Settings) -> Celery:
    """The app a worker runs for ``settings``: the shared configuration and the task modules.

    Example:
        >>> app = make_worker_celery(Settings(data_dir=tmp_path))
        >>> app.worker_main(["worker", "--pool", "solo"])  # doctest: +SKIP
    """
    app = make_celery(settings)
    app.conf.imports = TASK_MODULES
    # The file the container healthcheck reads (python -m worker.liveness).
    app.conf[CONF_KEY] = str(alive_path(settings.data_dir))
    app.steps["consumer"].add(AliveFile)
    return app


def get_app() -> Celery:
    """The process-wide app built from the environment (``MPQ_*``), created on first use."""
    global _app
    if _app is None:
        from mpq_service.settings import get_settings

        _app = make_worker_celery(get_settings())
    return _app


def __getattr__(name: str) -> Any:
    # ``celery -A worker.celery_app`` looks up ``app``; build it only then.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
