"""``/v1/jobs``: create (202, then handed to the workers), poll, list, cancel, delete."""

from __future__ import annotations

import logging
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Response
from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, EnqueueDep, SessionDep, StorageDep
from api.errors import ApiError, Conflict, NotFound
from api.models import Artifact, Dataset, Job, JobStatus, ModelFile, Tenant, utcnow
from api.routes._paging import CursorQuery, LimitQuery, page
from api.schemas import JobCreate, JobList, JobPublic

__all__ = ["RETRY_AFTER_S", "get_owned_job", "router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # polling hint while a job is not finished
_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def get_owned_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    """The tenant's job ``job_id``; 404 when missing or another tenant's."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise NotFound("job", job_id)
    return job


def _check_model(session: Session, tenant: Tenant, model_id: str) -> None:
    row = session.get(ModelFile, model_id)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound("model", model_id)


def _check_dataset(session: Session, tenant: Tenant, dataset_id: str) -> None:
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound("dataset", dataset_id)


def _retry_after(response: Response, job: Job) -> None:
    if not JobStatus(job.status).is_final:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)


@router.post("", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    enqueue: EnqueueDep,
) -> JobPublic:
    """Queue a job on an uploaded model and dataset; poll ``Location`` for its progress."""
    spec = body.job_spec()
    _check_model(session, tenant, body.model_id)
    _check_dataset(session, tenant, body.dataset_id)
    if body.eval_dataset_id is not None:
        _check_dataset(session, tenant, body.eval_dataset_id)
    job = Job(
        tenant_id=tenant.id,
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        eval_dataset_id=body.eval_dataset_id,
        spec=spec.to_dict(),
        status=JobStatus.QUEUED.value,
    )
    session.add(job)
    session.commit()  # the row exists before any worker can pick the id up
    try:
        enqueue(job.id)
    except Exception:
        log.exception("could not enqueue job %s", job.id)
        job.status = JobStatus.FAILED.value
        job.error_code = "queue_unavailable"
        job.error_message = "the job queue is unavailable; submit the job again later"
        job.finished_at = utcnow()
        session.commit()
        raise ApiError(
            503, "queue_unavailable", "the job queue is unavailable; try again later"
        ) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    _retry_after(response, job)
    return JobPublic.of(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    model_id: Annotated[str | None, Query(max_length=36, description="only on this model")] = None,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> JobList:
    """The tenant's job history, newest first, one page at a time."""
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    rows, next_cursor = page(session, stmt, Job.created_at, Job.id, limit, cursor)
    return JobList(items=[JobPublic.of(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(
    job_id: str, response: Response, session: SessionDep, tenant: CurrentTenant
) -> JobPublic:
    """The job's status, stage, progress, error and result; ``Retry-After`` until it ends."""
    job = get_owned_job(session, tenant, job_id)
    _retry_after(response, job)
    return JobPublic.of(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """Cancel a queued or running job (a running one stops at its next checkpoint); 409 once
    it has finished."""
    get_owned_job(session, tenant, job_id)
    # One conditional UPDATE, so a worker finishing the job at the same moment wins or loses
    # cleanly instead of being overwritten.
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant.id, Job.status.in_(_ACTIVE))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    changed = cast(CursorResult[Any], result).rowcount
    session.commit()
    job = get_owned_job(session, tenant, job_id)
    session.refresh(job)
    if not changed:
        raise Conflict("job_finished", f"job {job_id!r} has already ended ({job.status})")
    return JobPublic.of(job)


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job(
    job_id: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep
) -> Response:
    """Delete a finished job, its artifact rows and their stored files; 409 while it is queued
    or running (cancel it first)."""
    job = get_owned_job(session, tenant, job_id)
    if job.status in _ACTIVE:
        raise Conflict("job_active", f"job {job_id!r} is {job.status}; cancel it first")
    keys = list(
        session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job.id)).all()
    )
    session.delete(job)
    session.commit()
    # Rows first, then files: a failed file delete leaves an orphan object, never a row
    # pointing at nothing.
    for key in keys:
        try:
            storage.delete(key)
        except Exception:
            log.exception("could not delete artifact object %s of job %s", key, job_id)
    return Response(status_code=204)
