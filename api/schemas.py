"""Request and response bodies. Inputs (``JobCreate``) and outputs (``*Public``) are separate
from each other and from the ORM classes in :mod:`mpq_service.tables`."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from mpq_core.errors import SpecError
from mpq_core.spec import JobSpec
from mpq_service.tables import Artifact, Dataset, Job, ModelFile

__all__ = [
    "ArtifactList",
    "ArtifactPublic",
    "DatasetList",
    "DatasetPublic",
    "ErrorInfo",
    "JobCreate",
    "JobList",
    "JobPublic",
    "ModelList",
    "ModelPublic",
    "parse_job_spec",
]


class ErrorInfo(BaseModel):
    """Why a job failed: a stable code and a message saying what to fix."""

    code: str
    message: str


class _UploadPublic(BaseModel):
    """What the API says about an uploaded file; read straight off its ORM row."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str
    size: int
    sha256: str
    created_at: datetime


class ModelPublic(_UploadPublic):
    """An uploaded model; ``format`` is what the API detected (``torchscript`` or ``export``)."""

    @classmethod
    def of(cls, row: ModelFile) -> ModelPublic:
        return cls.model_validate(row)


class DatasetPublic(_UploadPublic):
    """An uploaded data file (``npz`` or ``safetensors``)."""

    @classmethod
    def of(cls, row: Dataset) -> DatasetPublic:
        return cls.model_validate(row)


class ModelList(BaseModel):
    items: list[ModelPublic]
    next_cursor: str | None = None


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    next_cursor: str | None = None


class JobCreate(BaseModel):
    """A job: which uploads to use and the spec (everything ``mpq quantize`` accepts)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "0b7c...",
                    "dataset_id": "5e1a...",
                    "spec": {"budgets": ["avg-bits=4"], "bits": [2, 4, 8]},
                }
            ]
        },
    )

    model_id: str = Field(min_length=1, max_length=36)
    dataset_id: str = Field(min_length=1, max_length=36)
    eval_dataset_id: str | None = Field(default=None, min_length=1, max_length=36)
    spec: dict[str, Any] = Field(description="a job spec, see mpq_core.spec.JobSpec")

    def job_spec(self) -> JobSpec:
        """The validated spec.

        Raises:
            SpecError: (or BudgetError) naming the first bad field.
        """
        return parse_job_spec(self.spec)


def parse_job_spec(spec: dict[str, Any]) -> JobSpec:
    """``spec`` (a job spec as JSON) validated as a :class:`JobSpec`.

    Raises:
        SpecError: (or BudgetError) naming the first bad field.
    """
    try:
        return JobSpec.from_dict(spec)
    except SpecError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        # The strict checks in mpq_core.spec_checks name every mistake they know; this is the
        # net under them, so that nothing a client sends is ever answered with a 500.
        raise SpecError(f"bad job spec: {exc}") from exc


class JobPublic(BaseModel):
    """A job as clients see it; ``result`` is the worker's summary once it succeeded."""

    id: str
    status: str
    stage: str | None
    progress: float
    model_id: str | None = Field(description="null once the model was deleted")
    dataset_id: str | None = Field(description="null once the dataset was deleted")
    eval_dataset_id: str | None
    spec: dict[str, Any]
    attempts: int
    error: ErrorInfo | None
    result: dict[str, Any] | None
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
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
        )


class JobList(BaseModel):
    """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page.
    ``total`` counts the jobs matching the filters on all pages."""

    items: list[JobPublic]
    next_cursor: str | None = None
    total: int


class ArtifactPublic(BaseModel):
    """One output file of a job; ``url`` downloads it."""

    name: str
    size: int
    sha256: str
    content_type: str
    created_at: datetime
    url: str

    @classmethod
    def of(cls, row: Artifact) -> ArtifactPublic:
        return cls(
            name=row.name,
            size=row.size,
            sha256=row.sha256,
            content_type=row.content_type,
            created_at=row.created_at,
            url=f"/v1/jobs/{row.job_id}/artifacts/{quote(row.name, safe='')}",
        )


class ArtifactList(BaseModel):
    items: list[ArtifactPublic]
