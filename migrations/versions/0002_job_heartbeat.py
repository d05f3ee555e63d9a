"""Job heartbeats: ``jobs.heartbeat_at`` and the reaper's index on (status, heartbeat_at).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

A running attempt stamps ``heartbeat_at`` every few seconds; the reaper re-queues running jobs
whose heartbeat is stale. Rows from before this revision have none: the reaper falls back to
``updated_at`` for them. Self-contained, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_status_heartbeat", "jobs", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_heartbeat", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
