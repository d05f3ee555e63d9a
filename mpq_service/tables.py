"""The service's tables as typed SQLAlchemy 2 ORM classes.

Every row a tenant owns carries ``tenant_id`` (NOT NULL), so each query can be scoped to the
caller's tenant directly. Ids are UUID strings (portable across SQLite and Postgres, safe to show
in URLs). Timestamps are timezone-aware UTC on both backends. The schema here and the migration
``migrations/versions/0001_initial.py`` must stay in step; ``tests/api/test_migrations.py``
compares them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from mpq_service.job_status import JOB_STATUSES, JobStatus

__all__ = [
    "DATASET_FORMATS",
    "MODEL_FORMATS",
    "ApiKey",
    "Artifact",
    "Base",
    "Dataset",
    "Job",
    "ModelFile",
    "SensitivityCache",
    "StageDuration",
    "Tenant",
    "UTCDateTime",
    "WebhookDelivery",
    "new_id",
    "utcnow",
]

# Deterministic constraint names: migrations (and SQLite batch alterations) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_FORMATS = ("torchscript", "export")
WEBHOOK_STATES = ("pending", "delivered", "failed")
DATASET_FORMATS = ("npz", "safetensors")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A fresh random UUID as a 36-character string."""
    return str(uuid.uuid4())


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    Postgres keeps the zone (``timestamptz``); SQLite has no zone, so values are converted to
    UTC on the way in and tagged UTC on the way out. Naive datetimes are refused on write.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                "naive datetime: use a timezone-aware value (mpq_service.tables.utcnow())"
            )
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base sharing one MetaData with the naming convention."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: sa.JSON(),
    }


def _tenant_fk() -> Mapped[str]:
    return mapped_column(
        sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )


class Tenant(Base):
    """An owner of resources; every API key belongs to exactly one."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", passive_deletes=True
    )


class ApiKey(Base):
    """A bearer key, stored only as its HMAC hash; ``prefix`` identifies it to its owner."""

    __tablename__ = "api_keys"
    __table_args__ = (sa.Index("ix_api_keys_prefix", "prefix"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = _tenant_fk()
    name: Mapped[str] = mapped_column(sa.String(200))
    prefix: Mapped[str] = mapped_column(sa.String(8))
    hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class _UploadColumns:
    """The columns every uploaded file has (models and datasets alike)."""

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    filename: Mapped[str] = mapped_column(sa.String(255))
    format: Mapped[str] = mapped_column(sa.String(16))
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    storage_key: Mapped[str] = mapped_column(sa.String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelFile(_UploadColumns, Base):
    """An uploaded model archive (TorchScript or torch.export), as detected from its content."""

    __tablename__ = "model_files"
    __table_args__ = (
        sa.CheckConstraint(_in_list("format", MODEL_FORMATS), name="format"),
        sa.Index("ix_model_files_tenant_created", "tenant_id", "created_at"),
    )


class Dataset(_UploadColumns, Base):
    """An uploaded calibration or evaluation data file (``.npz`` or ``.safetensors``)."""

    __tablename__ = "datasets"
    __table_args__ = (
        sa.CheckConstraint(_in_list("format", DATASET_FORMATS), name="format"),
        sa.Index("ix_datasets_tenant_created", "tenant_id", "created_at"),
    )


class Job(Base):
    """One quantization job: its spec, where it is, and a summary of its result.

    ``attempts`` counts worker starts (kept here, not in the broker, so a job that kills its
    worker every time fails after ``job_max_attempts``); it is also the number of the attempt
    now running, which every write of an attempt checks, so an attempt presumed dead and
    replaced can never overwrite its successor. ``heartbeat_at`` is stamped by the running
    attempt every few seconds; the reaper (``worker.reaper``) re-queues a running job whose
    heartbeat went stale. ``sensitivity_key`` names the :class:`SensitivityCache` entry the job
    used or produced. ``webhook_pending`` is true from the creation of a job with a
    ``webhook_url`` until its :class:`WebhookDelivery` is queued, once it is final
    (:mod:`mpq_service.webhooks`).
    """

    __tablename__ = "jobs"
    __table_args__ = (
        sa.CheckConstraint(_in_list("status", JOB_STATUSES), name="status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        # History listing: newest first within a tenant; id breaks ties for cursor pagination.
        sa.Index(
            "ix_jobs_tenant_created",
            "tenant_id",
            sa.text("created_at DESC"),
            sa.text("id DESC"),
        ),
        # The reaper's scan: running jobs by heartbeat age.
        sa.Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        # The webhook dispatcher's scan: finished jobs whose webhook is not queued yet.
        sa.Index("ix_jobs_webhook_pending", "webhook_pending", "status"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = _tenant_fk()
    # Null once the upload was deleted (allowed only after the job ended: migration 0003).
    model_id: Mapped[str | None] = mapped_column(
        sa.String(36), sa.ForeignKey("model_files.id", ondelete="SET NULL"), index=True
    )
    dataset_id: Mapped[str | None] = mapped_column(
        sa.String(36), sa.ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    eval_dataset_id: Mapped[str | None] = mapped_column(
        sa.String(36), sa.ForeignKey("datasets.id", ondelete="SET NULL"), default=None, index=True
    )
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.QUEUED.value)
    stage: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    progress: Mapped[float] = mapped_column(sa.Float, default=0.0)
    error_code: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(sa.Text, default=None)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    sensitivity_key: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    webhook_url: Mapped[str | None] = mapped_column(sa.String(2048), default=None)
    webhook_pending: Mapped[bool] = mapped_column(
        sa.Boolean, default=False, server_default=sa.false()
    )

    model: Mapped[ModelFile | None] = relationship(foreign_keys=[model_id])
    dataset: Mapped[Dataset | None] = relationship(foreign_keys=[dataset_id])
    eval_dataset: Mapped[Dataset | None] = relationship(foreign_keys=[eval_dataset_id])
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Artifact.name",
    )


class Artifact(Base):
    """One output file of a job (``model.pt``, ``report.json``, ...); deleted with its job."""

    __tablename__ = "artifacts"
    __table_args__ = (sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = _tenant_fk()
    name: Mapped[str] = mapped_column(sa.String(255))
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    storage_key: Mapped[str] = mapped_column(sa.String(512))
    content_type: Mapped[str] = mapped_column(sa.String(128), default="application/octet-stream")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class SensitivityCache(Base):
    """A stored sensitivity table, reusable by later jobs on the same model, data and analysis.

    ``key`` comes from :meth:`make_key`; it is unique per tenant (tables are never shared across
    tenants, even for identical uploads).
    """

    __tablename__ = "sensitivity_cache"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "key", name="uq_sensitivity_cache_tenant_id_key"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = _tenant_fk()
    key: Mapped[str] = mapped_column(sa.String(64))
    storage_key: Mapped[str] = mapped_column(sa.String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @staticmethod
    def make_key(model_sha256: str, dataset_sha256: str, analysis: Mapping[str, Any]) -> str:
        """sha256 over the model's and data's digests and the analysis settings (canonical JSON).

        Example:
            >>> key = SensitivityCache.make_key(model.sha256, data.sha256, {"method": "fisher"})
        """
        canonical = json.dumps(dict(analysis), sort_keys=True, separators=(",", ":"))
        payload = "\n".join([model_sha256, dataset_sha256, canonical])
        return hashlib.sha256(payload.encode()).hexdigest()


class WebhookDelivery(Base):
    """One webhook call to make, an outbox row: queued when its job is final, then posted
    (and retried) by the workers until a 2xx answer (``delivered``) or the last retry
    (``failed``, with ``last_error``).

    ``body`` is the exact JSON sent every time (the signature covers it). ``job_id`` is no
    foreign key: a job deleted after it finished still has its webhook delivered.
    ``next_attempt_at`` is also the claim: a worker posting the call pushes it past its time
    limit first, so no other worker takes the row meanwhile.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.CheckConstraint(_in_list("state", WEBHOOK_STATES), name="state"),
        sa.UniqueConstraint("job_id", name="uq_webhook_deliveries_job_id"),
        sa.Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(sa.String(36))
    tenant_id: Mapped[str] = _tenant_fk()
    url: Mapped[str] = mapped_column(sa.String(2048))
    body: Mapped[str] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.String(16), default="pending")
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class StageDuration(Base):
    """How long the stages of succeeded jobs took, as the buckets of a histogram: per stage and
    bucket (upper bound ``le`` in seconds, as Prometheus spells it, ``+Inf`` for the last), how
    many durations fell in it (not cumulative) and their sum.

    Workers add to it in the transaction that records a job's success, so every job counts once
    and every API process reads the same totals at ``/metrics``
    (:mod:`mpq_service.stage_durations`). Not tied to jobs: deleting a job leaves the totals
    (counters only grow).
    """

    __tablename__ = "job_stage_durations"

    stage: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    le: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    observations: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)
