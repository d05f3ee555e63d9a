"""The state-changing actions on a tenant's resources, shared by the JSON API and the web pages:
cancel a job, delete a job, delete an uploaded model or dataset.

Each runs in the caller's session and commits. Rows go first, stored files after: a file that
cannot be deleted leaves an orphan object (logged), never a row pointing at nothing.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session

from api.errors import Conflict
from api.ownership import get_owned
from mpq_service.job_status import ACTIVE_STATUSES, JobStatus
from mpq_service.storage import Storage
from mpq_service.tables import Artifact, Dataset, Job, ModelFile, Tenant, utcnow
from mpq_service.webhooks import queue_webhook

__all__ = ["IN_USE_SHOWN", "cancel_job", "delete_job", "delete_upload"]

log = logging.getLogger(__name__)

IN_USE_SHOWN = 3  # how many of the jobs using an upload a 409 names

Upload = TypeVar("Upload", ModelFile, Dataset)


def cancel_job(session: Session, job_id: str, tenant: Tenant) -> bool:
    """Cancel the job if it is queued or running; whether it was (False: it had ended).

    One conditional UPDATE, so a worker finishing the job at the same moment wins or loses
    cleanly instead of being overwritten; a running job's worker stops at its next checkpoint.
    """
    get_owned(session, Job, job_id, tenant)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant.id, Job.status.in_(ACTIVE_STATUSES))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(cast(CursorResult[Any], result).rowcount)


def _delete_objects(storage: Storage, keys: list[str], owner: str) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except Exception:
            log.exception("could not delete object %s of %s", key, owner)


def delete_job(session: Session, storage: Storage, job_id: str, tenant: Tenant) -> None:
    """Delete the job, its artifact rows and their stored files, cancelling it first if it is
    queued or running (its worker then finds the row gone and deletes what it had uploaded)."""
    cancel_job(session, job_id, tenant)
    # Locked, so that a worker's final write (which locks the row too) cannot add artifact rows
    # between the listing below and the delete.
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
    queue_webhook(session, job)  # the job is final now; its webhook outlives its row
    keys = list(
        session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job.id)).all()
    )
    session.delete(job)
    session.commit()
    _delete_objects(storage, keys, f"job {job_id}")


def _active_users(session: Session, row: ModelFile | Dataset) -> list[str]:
    uses = (
        [Job.model_id == row.id]
        if isinstance(row, ModelFile)
        else [Job.dataset_id == row.id, Job.eval_dataset_id == row.id]
    )
    stmt = (
        select(Job.id)
        .where(Job.tenant_id == row.tenant_id, or_(*uses), Job.status.in_(ACTIVE_STATUSES))
        .order_by(Job.created_at)
        .limit(IN_USE_SHOWN + 1)
    )
    return list(session.scalars(stmt).all())


def delete_upload(
    session: Session,
    storage: Storage,
    table: type[Upload],
    ident: str,
    tenant: Tenant,
) -> None:
    """Delete an uploaded model or dataset and its stored file.

    Jobs that used it and have ended stay in the history and name no upload any more (the
    foreign keys are ``ON DELETE SET NULL``).

    Raises:
        NotFound: no such upload, or another tenant's.
        Conflict: ``in_use`` while a queued or running job uses it.
    """
    get_owned(session, table, ident, tenant)
    # Locked: a job being created on this upload at the same moment waits for this transaction
    # (its foreign-key check needs the row), then fails to find the upload.
    row = session.scalars(select(table).where(table.id == ident).with_for_update()).one()
    users = _active_users(session, row)
    if users:
        noun = "model" if table is ModelFile else "dataset"
        shown = ", ".join(repr(u) for u in users[:IN_USE_SHOWN])
        more = " and others" if len(users) > IN_USE_SHOWN else ""
        raise Conflict(
            "in_use",
            f"{noun} {ident!r} is used by queued or running job(s) {shown}{more}; "
            "wait for them to end or cancel them, then delete it",
        )
    key = row.storage_key
    session.delete(row)
    session.commit()
    _delete_objects(storage, [key], f"{table.__tablename__} {ident}")
