"""A job as clients see it (:class:`JobPublic`): the body of ``GET /v1/jobs/{id}``, of a job
event stream's final event and of a webhook call, one definition for the API and the workers
(which send the webhooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mpq_service.job_status import JobStatus
from mpq_service.tables import Job

__all__ = ["ErrorInfo", "JobPublic"]

_EXAMPLE_ID = "3f2b8c1e-5d4a-4e9b-9a7c-1d2e3f4a5b6c"
_EXAMPLE_WHEN = "2026-12-06T10:00:00Z"


class ErrorInfo(BaseModel):
    """Why a job failed: a stable code and a message saying what to fix."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"code": "budget_infeasible", "message": "avg-bits=1 is below 2 bits"}]
        }
    )

    code: str
    message: str


class JobPublic(BaseModel):
    """A job as clients see it; ``result`` is the worker's summary once it succeeded, and
    ``webhook_url`` where its final state is posted (if anywhere)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _EXAMPLE_ID,
                    "status": "running",
                    "stage": "finetune",
                    "progress": 0.62,
                    "model_id": _EXAMPLE_ID,
                    "dataset_id": _EXAMPLE_ID,
                    "eval_dataset_id": None,
                    "spec": {
                        "schema_version": 2,
                        "kind": "mpq.job_spec",
                        "budgets": ["avg-bits=4"],
                    },
                    "attempts": 1,
                    "error": None,
                    "result": None,
                    "webhook_url": "https://hooks.example.com/mpq",
                    "created_at": _EXAMPLE_WHEN,
                    "started_at": _EXAMPLE_WHEN,
                    "finished_at": None,
                    "updated_at": _EXAMPLE_WHEN,
                }
            ]
        }
    )

    id: str
    status: JobStatus
    stage: str | None = Field(description="the pipeline stage running now, or the last one")
    progress: float = Field(ge=0, le=1)
    model_id: str | None = Field(description="null once the model was deleted")
    dataset_id: str | None = Field(description="null once the dataset was deleted")
    eval_dataset_id: str | None
    spec: dict[str, Any]
    attempts: int
    error: ErrorInfo | None
    # The stored summary, passed through as the worker wrote it; the OpenAPI document describes
    # it as a JobResult (api.openapi).
    result: dict[str, Any] | None
    webhook_url: str | None = Field(
        default=None, description="where the job's final state is POSTed, if anywhere"
    )
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
