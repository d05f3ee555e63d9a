"""A job as clients see it (:class:`JobPublic`): the body of ``GET /v1/jobs/{id}``, of a job
event stream's final event and of a webhook call, one definition for the API and the workers
(which send the webhooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from mpq_service.tables import Job

__all__ = ["ErrorInfo", "JobPublic"]


class ErrorInfo(BaseModel):
    """Why a job failed: a stable code and a message saying what to fix."""

    code: str
    message: str


class JobPublic(BaseModel):
    """A job as clients see it; ``result`` is the worker's summary once it succeeded, and
    ``webhook_url`` where its final state is posted (if anywhere)."""

    id: str
    status: str
    stage: str | None
    progress: float
    model_id: str
    dataset_id: str
    eval_dataset_id: str | None
    spec: dict[str, Any]
    attempts: int
    error: ErrorInfo | None
    result: dict[str, Any] | None
    webhook_url: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Job) -> JobPublic:
        fields = {name: getattr(row, name) for name in cls.model_fields if name != "error"}
        code = row.error_code
        fields["error"] = None if code is None else ErrorInfo(code=code, message=row.error_message or "")  # fmt: skip
        return cls(**fields)
