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
        error = None
        if row.error_code is not None:
            error = ErrorInfo(code=row.error_code, message=row.error_message or "")
        return cls(
            id=row.id,
            status=row.status,
            stage=row.stage,
            progress=row.progress,
            model_id=row.model_id,
            dataset_id=row.dataset_id,
            eval_dataset_id=row.eval_dataset_id,
            spec=row.spec,
            attempts=row.attempts,
            error=error,
            result=row.result,
            webhook_url=row.webhook_url,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
        )
