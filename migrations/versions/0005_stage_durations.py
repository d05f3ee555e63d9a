"""Job stage durations for ``/metrics``: the table ``job_stage_durations``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Per stage and histogram bucket, how many succeeded jobs' stages took that long and their total
seconds (see ``mpq_service.stage_durations``). Starts empty: jobs finished before this revision
are not counted. Self-contained, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_stage_durations",
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("le", sa.String(16), nullable=False),
        sa.Column("observations", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("stage", "le", name="pk_job_stage_durations"),
    )


def downgrade() -> None:
    op.drop_table("job_stage_durations")
