"""What the API (producer) and the workers (consumers) must agree on: the task name, the default
queue and the whole Celery configuration, built in one place from :class:`Settings`.

:func:`make_celery` builds an app from it; the API sends :data:`TASK_RUN_JOB` with it
(:mod:`api.queue`), and :mod:`worker.celery_app` adds the task module for the workers. Importing
this module imports celery, but reads no settings, creates no folders and imports no torch.

Long GPU jobs (see STYLE.md):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job whose worker dies is re-queued, not
  lost; the attempt counter in the database (``Job.attempts``, capped by
  ``job_max_attempts``) stops a job that kills its worker every time from looping.
- ``worker_prefetch_multiplier=1``: a worker holds one job at a time; idle workers get the rest.
- ``task_time_limit`` (hard) and ``task_soft_time_limit`` (raises in the task, which fails the
  job cleanly) come from ``job_time_limit_s``; the broker's ``visibility_timeout`` is set well
  above them, so a job still running is never redelivered to a second worker.
- Run GPU workers with the prefork pool (``--concurrency 1``, one worker per GPU): the parent
  never touches CUDA, the child imports torch inside the task. Hard time limits need prefork.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery

if TYPE_CHECKING:
    from mpq_service.settings import Settings

__all__ = [
    "DEFAULT_QUEUE",
    "TASK_RUN_JOB",
    "celery_config",
    "filesystem_broker_options",
    "make_celery",
    "soft_time_limit",
]

DEFAULT_QUEUE = "mpq"
TASK_RUN_JOB = "mpq.run_job"


def soft_time_limit(hard_s: int) -> int:
    """The soft time limit (the attempt fails cleanly) below a hard limit of ``hard_s``."""
    # Leave the task time to record its failure before the hard kill: 10% of the limit, at least
    # 1 s and at most 5 min.
    grace = min(300, max(1, hard_s // 10))
    return max(1, hard_s - grace)


def _visibility_timeout(hard_s: int) -> int:
    # Comfortably above the hard limit (Redis redelivers unacked messages after this long).
    return hard_s + max(600, hard_s // 4)


def filesystem_broker_options(broker_dir: Path) -> dict[str, Any]:
    """Transport options of the server-less ``filesystem://`` broker rooted at ``broker_dir``
    (its folders are created). Producers write and consumers read the same ``queue`` folder."""
    queue = broker_dir / "queue"
    processed = broker_dir / "processed"
    control = broker_dir / "control"
    for folder in (queue, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
        "polling_interval": 0.5,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The whole Celery configuration for ``settings``, as one dict."""
    hard = int(settings.job_time_limit_s)
    transport: dict[str, Any] = {"visibility_timeout": _visibility_timeout(hard)}
    if settings.broker_url.startswith("filesystem:"):
        transport.update(filesystem_broker_options(Path(settings.broker_dir)))
    backend = settings.result_backend or None
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_backend": backend,
        # Job state lives in the database; Celery results are only kept if a backend is set.
        "task_ignore_result": backend is None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": DEFAULT_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": hard,
        "task_soft_time_limit": soft_time_limit(hard),
        "task_track_started": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
        "enable_utc": True,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for ``settings`` (the filesystem broker's folders are created):
    the API sends tasks with it, the workers (:mod:`worker.celery_app`) run them with it.

    Example:
        >>> app = make_celery(Settings(data_dir=tmp_path))
        >>> app.send_task(TASK_RUN_JOB, args=[job_id])  # doctest: +SKIP
    """
    app = Celery("mpq", set_as_current=False)
    app.config_from_object(celery_config(settings))
    return app
