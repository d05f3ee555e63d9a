"""Handing jobs to the workers: :func:`celery_enqueue` sends ``mpq.run_job`` with the job's id.

The task name and the Celery app come from :mod:`mpq_service.celery_config` (imported lazily,
torch-free), the configuration the workers run with, so the API and the workers agree on the
broker, the default queue and the filesystem broker's folders under ``settings.broker_dir``.
Importing this module imports neither celery nor torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpq_service.settings import Settings

__all__ = ["Enqueue", "celery_enqueue"]

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

    from mpq_service.celery_config import TASK_RUN_JOB, make_celery

    app: Celery | None = None

    def enqueue(job_id: str) -> None:
        nonlocal app
        if app is None:
            app = make_celery(settings)
        app.send_task(TASK_RUN_JOB, args=[job_id])

    return enqueue
