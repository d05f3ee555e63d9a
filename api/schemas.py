"""Request and response bodies. Inputs (``JobCreate``) and outputs (``*Public``) are separate
from each other and from the ORM classes in :mod:`mpq_service.tables`."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from mpq_core.errors import SpecError
from mpq_core.spec import JobSpec
from mpq_service.job_public import ErrorInfo, JobPublic
from mpq_service.tables import Artifact, Dataset, ModelFile

__all__ = [
    "ArtifactList",
    "ArtifactPublic",
    "DatasetList",
    "DatasetPublic",
    "ErrorInfo",
    "JobCreate",
    "JobList",
    "JobPublic",
    "JobResult",
    "ModelList",
    "ModelPublic",
    "parse_job_spec",
]


_ID = "3f2b8c1e-5d4a-4e9b-9a7c-1d2e3f4a5b6c"
_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
_WHEN = "2026-12-06T10:00:00Z"


class JobResult(BaseModel):
    """A succeeded job's summary (``report.json`` holds everything); fields a newer worker adds
    are passed through."""

    model_config = ConfigDict(extra="allow")

    budgets: Any = Field(None, description="the budgets asked for and what was reached")
    predicted_loss_increase: float | None = Field(
        None, description="loss increase the Fisher model predicts for the allocation"
    )
    measured_loss_increase: float | None = Field(None, description="the same, measured")
    metrics: dict[str, Any] | None = Field(None, description="float and quantized metrics")
    sizes: dict[str, Any] | None = Field(None, description="sizes of the model, float and packed")
    timings: dict[str, Any] | None = Field(None, description="seconds per pipeline stage")
    worker_timings: dict[str, Any] | None = Field(None, description="the worker's own seconds")
    allocation: Any = Field(None, description="bits per layer")
    model: dict[str, Any] | None = Field(None, description="what was found in the model")
    data: dict[str, Any] | None = Field(None, description="what was found in the data")
    sensitivity: dict[str, Any] | None = Field(
        None, description="the sensitivity table's cache key and whether it was reused"
    )
    device: str | None = Field(None, description="where the job ran")
    artifacts: Any = Field(None, description="the output files the job wrote")


class _UploadPublic(BaseModel):
    """What the API says about an uploaded file; read straight off its ORM row."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": _ID,
                    "filename": "model.pt",
                    "format": "torchscript",
                    "size": 4473536,
                    "sha256": _SHA,
                    "created_at": _WHEN,
                }
            ]
        },
    )

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
    spec: dict[str, Any] = Field(description="the job spec (schema: JobSpec)")
    webhook_url: str | None = Field(
        default=None,
        # Checked by the route (mpq_service.webhook_targets), one message for JSON and forms.
        json_schema_extra={"format": "uri", "maxLength": 2048},
        description="an http(s) URL the job's final state is POSTed to, signed with "
        "X-MPQ-Signature (see mpq_service.webhook_signature); no credentials in it",
    )

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
