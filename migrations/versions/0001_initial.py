"""Initial schema: tenants, API keys, uploads, jobs, artifacts, sensitivity cache.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Hand-written and self-contained (no imports from ``mpq_service``), so it keeps describing this revision
even as the models move on. Constraint names follow ``mpq_service.tables.NAMING_CONVENTION``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(36), nullable=False)


def _tenant_id() -> sa.Column[str]:
    return sa.Column("tenant_id", sa.String(36), nullable=False)


def _created_at() -> sa.Column[datetime]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants", ondelete="CASCADE"
    )


def _upload_table(table: str, formats: tuple[str, ...]) -> None:
    allowed = ", ".join(f"'{f}'" for f in formats)
    op.create_table(
        table,
        _id(),
        _tenant_id(),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        sa.CheckConstraint(f"format IN ({allowed})", name=f"ck_{table}_format"),
        _tenant_fk(table),
    )
    op.create_index(f"ix_{table}_tenant_created", table, ["tenant_id", "created_at"])


def upgrade() -> None:
    op.create_table(
        "tenants",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.create_table(
        "api_keys",
        _id(),
        _tenant_id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(8), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        _created_at(),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("hash", name="uq_api_keys_hash"),
        _tenant_fk("api_keys"),
    )
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])

    _upload_table("model_files", ("torchscript", "export"))
    _upload_table("datasets", ("npz", "safetensors"))

    op.create_table(
        "jobs",
        _id(),
        _tenant_id(),
        sa.Column("model_id", sa.String(36), nullable=False),
        sa.Column("dataset_id", sa.String(36), nullable=False),
        sa.Column("eval_dataset_id", sa.String(36), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("sensitivity_key", sa.String(64), nullable=True),
        _created_at(),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_jobs_status",
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        _tenant_fk("jobs"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["model_files.id"], name="fk_jobs_model_id_model_files"
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name="fk_jobs_dataset_id_datasets"
        ),
        sa.ForeignKeyConstraint(
            ["eval_dataset_id"], ["datasets.id"], name="fk_jobs_eval_dataset_id_datasets"
        ),
    )
    op.create_index(
        "ix_jobs_tenant_created",
        "jobs",
        ["tenant_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )

    op.create_table(
        "artifacts",
        _id(),
        sa.Column("job_id", sa.String(36), nullable=False),
        _tenant_id(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        sa.Column("content_type", sa.String(128), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_id_name"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_artifacts_job_id_jobs", ondelete="CASCADE"
        ),
        _tenant_fk("artifacts"),
    )

    op.create_table(
        "sensitivity_cache",
        _id(),
        _tenant_id(),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(512), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_sensitivity_cache"),
        sa.UniqueConstraint("tenant_id", "key", name="uq_sensitivity_cache_tenant_id_key"),
        _tenant_fk("sensitivity_cache"),
    )


def downgrade() -> None:
    op.drop_table("sensitivity_cache")
    op.drop_table("artifacts")
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    op.drop_table("jobs")
    for table in ("datasets", "model_files"):
        op.drop_index(f"ix_{table}_tenant_created", table_name=table)
        op.drop_table(table)
    op.drop_index("ix_api_keys_prefix", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
