"""Handing jobs to the workers: :func:`celery_enqueue` sends ``mpq.run_job`` with the job's id.

The Celery app comes from :func:`worker.celery_app.make_celery` (imported lazily, torch-free), so
the API and the workers agree on the broker, the default queue and the filesystem broker's
folders under ``settings.broker_dir``. Importing this module imports neither celery nor torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.settings import Settings

__all__ = ["TASK_RUN_JOB", "Enqueue", "celery_enqueue"]

TASK_RUN_JOB = "mpq.run_job"

Enqueue = Callable[[str], None]
"""Hands a job id to the workers; raises if the broker cannot take it."""


def celery_enqueue(settings: Settings) -> Enqueue:
    """A function sending the task ``mpq.run_job`` with a job id through the settings' broker.

    The Celery app is built once, on the first call (no broker I/O before a job is created).

    Example:
        >>> enqueue = celery_enqueue(get_settings())
        >>> enqueue(job.id)  # doctest: +SKIP
    """
    from celery import Celery

    app: Celery | None = None

    def enqueue(job_id: str) -> None:
        nonlocal app
        if app is None:
            from worker.celery_app import make_celery

            app = make_celery(settings)
        app.send_task(TASK_RUN_JOB, args=[job_id])

    return enqueue
