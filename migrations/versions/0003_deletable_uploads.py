"""Deletable uploads: a job's model and datasets may be deleted once the job has ended.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

``jobs.model_id``, ``dataset_id`` and ``eval_dataset_id`` become nullable with ``ON DELETE SET
NULL``: ``DELETE /v1/models/{id}`` (and datasets) is refused while a queued or running job uses
the upload, and afterwards leaves the jobs that used it in the history, naming no upload. Each
column gets an index, so that the in-use check and the ``SET NULL`` do not scan every job.
Self-contained, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (column, referred table) of every upload a job names.
_REFERENCES = (
    ("model_id", "model_files"),
    ("dataset_id", "datasets"),
    ("eval_dataset_id", "datasets"),
)


def _recreate_foreign_keys(ondelete: str | None) -> None:
    with op.batch_alter_table("jobs") as batch:
        for column, referred in _REFERENCES:
            name = f"fk_jobs_{column}_{referred}"
            batch.drop_constraint(name, type_="foreignkey")
            batch.create_foreign_key(name, referred, [column], ["id"], ondelete=ondelete)
            if column != "eval_dataset_id":
                batch.alter_column(
                    column, existing_type=sa.String(36), nullable=ondelete is not None
                )


def upgrade() -> None:
    _recreate_foreign_keys("SET NULL")
    for column, _ in _REFERENCES:
        op.create_index(f"ix_jobs_{column}", "jobs", [column])


def downgrade() -> None:
    # Refused while a job names no model or dataset: those rows cannot go back to NOT NULL.
    for column, _ in _REFERENCES:
        op.drop_index(f"ix_jobs_{column}", table_name="jobs")
    _recreate_foreign_keys(None)
