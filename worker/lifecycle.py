"""What a Celery worker's main process does besides running tasks (Celery signal handlers).

- At start (``worker_init``): when started by ``mpq serve`` (``MPQ_WORKER_PARENT_PID`` set), ask
  Linux to send this process SIGTERM when that parent dies, and exit at once if it is already
  gone. Done here rather than in a ``preexec_fn`` because ``mpq serve`` restarts its worker from
  a thread, where ``preexec_fn`` is unsafe.
- Once ready (``worker_ready``): a :class:`~mpq_service.reaper.Reaper` thread, with an engine of
  its own, re-queues the jobs of dead workers (the first pass at once, so a restarted worker
  picks up what its predecessor left), and a :class:`~mpq_service.webhooks.WebhookDispatcher`
  thread, on the same engine, posts the webhooks of finished jobs.
- At shutdown (``worker_shutdown``): both stop.

Prefork pool children inherit the reaper's engine across the fork: ``worker_process_init``
drops it there without closing the parent's connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from mpq_service.reaper import Reaper
    from mpq_service.webhooks import WebhookDispatcher

__all__ = ["PARENT_PID_ENV", "start_reaper", "stop_reaper"]

log = logging.getLogger(__name__)

#: Set by ``mpq serve`` to its own pid: the worker stops when that process dies.
PARENT_PID_ENV = "MPQ_WORKER_PARENT_PID"

_reaper: Reaper | None = None
_dispatcher: WebhookDispatcher | None = None
_engine: Engine | None = None


def _exit_with_parent() -> None:
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    with contextlib.suppress(Exception):  # Linux only; elsewhere the worker just outlives serve
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != expected:
        # mpq serve died before the request above took effect: nobody will stop this worker.
        log.error("the mpq serve process that started this worker is gone; exiting")
        os._exit(1)


def start_reaper(app: Any) -> Reaper:
    """Start this process's reaper thread, sending re-queued jobs through ``app``, and its
    webhook dispatcher."""
    global _reaper, _dispatcher, _engine
    from mpq_service.celery_config import TASK_RUN_JOB
    from mpq_service.db import make_engine, make_sessionmaker
    from mpq_service.reaper import Reaper
    from mpq_service.settings import get_settings
    from mpq_service.webhooks import WebhookDispatcher

    settings = get_settings()
    _engine = make_engine(settings.database_url)

    def enqueue(job_id: str) -> None:
        app.send_task(TASK_RUN_JOB, args=[job_id])

    # httpx logs every request's URL at INFO; a webhook URL may carry its receiver's token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    factory = make_sessionmaker(_engine)
    _reaper = Reaper(settings, factory, enqueue).start()
    _dispatcher = WebhookDispatcher(settings, factory).start()
    log.info(
        "reaper started: every %.0f s, jobs without a heartbeat for %.0f s are re-queued",
        settings.reaper_interval_s,
        settings.job_stale_after_s,
    )
    return _reaper


def stop_reaper() -> None:
    global _reaper, _dispatcher, _engine
    if _reaper is not None:
        _reaper.stop()
        _reaper = None
    if _dispatcher is not None:
        _dispatcher.stop()
        _dispatcher = None
    if _engine is not None:
        _engine.dispose()
        _engine = None


@worker_init.connect
def _on_worker_init(**_: object) -> None:
    _exit_with_parent()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: object) -> None:
    try:
        start_reaper(sender.app)
    except Exception:  # the worker still runs jobs; heartbeats still go stale for others' reapers
        log.exception("reaper not started")


@worker_shutdown.connect
def _on_worker_shutdown(**_: object) -> None:
    stop_reaper()


@worker_process_init.connect
def _forget_reaper_in_child(**_: object) -> None:
    global _reaper, _dispatcher, _engine
    if _engine is not None:
        _engine.dispose(close=False)  # the parent's connections stay the parent's
    _reaper = _dispatcher = _engine = None
