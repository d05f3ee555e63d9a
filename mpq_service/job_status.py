"""The states of a job, shared by the API (which creates, cancels and lists jobs) and the workers
(which run them), and checked by the ``jobs.status`` column's constraint."""

from __future__ import annotations

from enum import Enum

__all__ = ["ACTIVE_STATUSES", "JOB_STATUSES", "JobStatus"]


class JobStatus(str, Enum):
    """Lifecycle of a job; ``succeeded``, ``failed`` and ``cancelled`` are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        # The value, as StrEnum gives it: an f-string or a template shows "cancelled", never
        # "JobStatus.CANCELLED" (str + Enum alone would; StrEnum needs Python 3.11).
        return self.value

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


JOB_STATUSES = tuple(s.value for s in JobStatus)
#: The states of a job not finished yet (it may still be cancelled, and not yet deleted).
ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
