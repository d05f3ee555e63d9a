"""Job webhooks: ``jobs.webhook_url`` and ``jobs.webhook_pending``, and the outbox table
``webhook_deliveries``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

A job created with a ``webhook_url`` is ``webhook_pending`` until the workers queue its call in
``webhook_deliveries`` (once the job is final), and post it from there with retries. Rows from
before this revision have no webhook (``webhook_pending`` false). Self-contained, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_url", sa.String(2048), nullable=True))
        batch.add_column(
            sa.Column("webhook_pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index("ix_jobs_webhook_pending", "jobs", ["webhook_pending", "status"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_state"
        ),
        sa.UniqueConstraint("job_id", name="uq_webhook_deliveries_job_id"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_webhook_deliveries_tenant_id_tenants",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_state_next", "webhook_deliveries", ["state", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_state_next", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_jobs_webhook_pending", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_pending")
        batch.drop_column("webhook_url")
