"""``/v1/jobs``: create (202, then handed to the workers) from JSON or from a multipart form
carrying the files too, poll, list, cancel, delete."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import actions
from api.deps import (
    CurrentTenant,
    EnqueueDep,
    SessionDep,
    StorageDep,
    UploadContext,
    UploadContextDep,
)
from api.errors import ApiError, Conflict
from api.multipart import MultipartStream
from api.ownership import get_owned
from api.queue import Enqueue
from api.routes._paging import CursorQuery, LimitQuery, page
from api.routes._upload_flow import (
    DATASET_UPLOAD,
    MODEL_UPLOAD,
    UploadKind,
    UploadRow,
    deleted_on_failure,
    insert_rows,
    refuse_declared_length,
    store_file,
)
from api.routing import SessionReleasingRoute
from api.schemas import JobCreate, JobList, JobPublic, parse_job_spec
from mpq_core.spec import JobSpec
from mpq_service.job_status import JobStatus
from mpq_service.settings import Settings
from mpq_service.tables import Dataset, Job, ModelFile, Tenant, utcnow
from mpq_service.webhook_targets import MAX_URL_LENGTH, WebhookTargetError, check_webhook_url
from mpq_service.webhooks import webhooks_unavailable

__all__ = ["RETRY_AFTER_S", "enqueue_job", "new_job", "router"]

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=SessionReleasingRoute)
log = logging.getLogger(__name__)

RETRY_AFTER_S = 2  # polling hint while a job is not finished


def _retry_after(response: Response, job: Job) -> None:
    if not JobStatus(job.status).is_final:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)


# OpenAPI: the route reads its body itself (JSON, or a multipart form streamed part by part).
_FILE = {"type": "string", "format": "binary"}
_JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "data", "spec"],
                    "properties": {
                        "model": {**_FILE, "description": "the model file, as POST /v1/models"},
                        "data": {**_FILE, "description": "calibration data, as POST /v1/datasets"},
                        "eval_data": {**_FILE, "description": "optional evaluation data"},
                        "spec": {"type": "string", "description": "the job spec as JSON"},
                        "webhook_url": {
                            "type": "string",
                            "description": "optional: where the final state is POSTed",
                        },
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
        },
    }
}
# The form's file parts, each stored as POST /v1/models or POST /v1/datasets would store it.
_FILE_PARTS: dict[str, UploadKind[Any]] = {
    "model": MODEL_UPLOAD,
    "data": DATASET_UPLOAD,
    "eval_data": DATASET_UPLOAD,
}
_SPEC_MAX_BYTES = 1024 * 1024
_FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers
_JSON_MAX_BYTES = _SPEC_MAX_BYTES + 4096  # the spec and the ids around it


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def check_webhook(url: str | None, settings: Settings) -> str | None:
    """``url`` if it may be the job's webhook (see :mod:`mpq_service.webhook_targets`), else
    422 ``invalid_request``; None stays None."""
    if url is None:
        return None
    unavailable = webhooks_unavailable(settings)
    if unavailable:
        raise _invalid(f"webhook_url: {unavailable}")
    try:
        return check_webhook_url(url, allow_private=settings.webhook_allow_private)
    except WebhookTargetError as exc:
        raise _invalid(f"webhook_url: {exc}") from None


async def _read_json_body(request: Request) -> bytes:
    """The JSON body, refused with 413 past :data:`_JSON_MAX_BYTES` (declared or sent) so that a
    huge body cannot fill the API's memory."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(
        413,
        "request_too_large",
        f"a job's JSON body may be at most {_JSON_MAX_BYTES} bytes; upload files through "
        "POST /v1/models and POST /v1/datasets and name their ids",
    )
    if declared.isdigit() and int(declared) > _JSON_MAX_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _JSON_MAX_BYTES:
            raise too_large
    return bytes(body)


def _parse_json_body(raw: bytes) -> JobCreate:
    """The JSON body as :class:`JobCreate`, invalid ones answered like FastAPI's own bodies."""
    try:
        return JobCreate.model_validate_json(raw or b"null")
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def _check_uploads(session: Session, tenant: Tenant, body: JobCreate) -> None:
    get_owned(session, ModelFile, body.model_id, tenant)
    get_owned(session, Dataset, body.dataset_id, tenant)
    if body.eval_dataset_id is not None:
        get_owned(session, Dataset, body.eval_dataset_id, tenant)


def _insert_job(session: Session, tenant: Tenant, body: JobCreate, spec: JobSpec) -> Job:
    _check_uploads(session, tenant, body)
    job = new_job(
        tenant, body.model_id, body.dataset_id, body.eval_dataset_id, spec,
        webhook_url=body.webhook_url,
    )  # fmt: skip
    session.add(job)
    try:
        session.commit()  # the row exists before any worker can pick the id up
    except IntegrityError:
        # An upload was deleted while this job was being created (api.actions.delete_upload
        # locks it): name the one that is gone.
        session.rollback()
        _check_uploads(session, tenant, body)
        raise
    return job


def new_job(
    tenant: Tenant,
    model_id: str,
    dataset_id: str,
    eval_dataset_id: str | None,
    spec: JobSpec,
    *,
    webhook_url: str | None = None,
) -> Job:
    """A queued job row (not yet added to a session); the caller has checked that the tenant
    owns the uploads it names (and the webhook URL, when there is one)."""
    return Job(
        tenant_id=tenant.id,
        model_id=model_id,
        dataset_id=dataset_id,
        eval_dataset_id=eval_dataset_id,
        spec=spec.to_dict(),
        status=JobStatus.QUEUED.value,
        webhook_url=webhook_url,
        webhook_pending=webhook_url is not None,
    )


def enqueue_job(session: Session, job: Job, enqueue: Enqueue) -> None:
    """Hand the committed ``job`` to the workers; when the queue refuses it the job is marked
    failed (``queue_unavailable``) and a 503 is raised."""
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


def _form_spec(raw: bytes) -> JobSpec:
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise _invalid("spec: not valid JSON") from None
    if not isinstance(spec, dict):
        raise _invalid("spec: must be a JSON object (the job spec)")
    return parse_job_spec(spec)


async def _read_form(
    form: MultipartStream, upload: UploadContext, stored: list[UploadRow]
) -> tuple[dict[str, UploadRow], JobSpec, str | None]:
    """The form's files, stored through the upload routes' flow (each row also appended to
    ``stored`` as soon as its object exists), its spec and its webhook URL."""
    rows: dict[str, UploadRow] = {}
    spec: JobSpec | None = None
    webhook: str | None = None
    seen: set[str] = set()
    while (part := await form.next_part()) is not None:
        name = part.name
        if name not in (*_FILE_PARTS, "spec", "webhook_url"):
            raise _invalid(
                f"unknown form part {name!r}: send model, data, eval_data, spec, webhook_url"
            )
        if name in seen:
            raise _invalid(f"the form part {name!r} was sent twice")
        seen.add(name)
        if name == "spec":
            spec = _form_spec(await form.read_field(_SPEC_MAX_BYTES, name))
            continue
        if name == "webhook_url":
            raw = await form.read_field(4 * MAX_URL_LENGTH, name)
            webhook = check_webhook(raw.decode("utf-8", "replace"), upload.settings)
            continue
        row = await store_file(form.read(), _FILE_PARTS[name], upload, part.filename)
        stored.append(row)
        rows[name] = row
    missing = [n for n in ("model", "data", "spec") if n not in seen]
    if missing or spec is None:
        raise _invalid(f"missing form part(s): {', '.join(missing)}")
    return rows, spec, webhook


async def _create_from_form(request: Request, boundary: bytes, upload: UploadContext) -> Job:
    """Store the form's files as a model and datasets and insert them with the job, in one
    transaction. Each file goes through the upload routes' flow (same keys, sha256, size limit,
    sniffing and codes); on any failure every object stored so far is deleted again."""
    limit = upload.settings.max_upload_bytes
    most = len(_FILE_PARTS) * limit + _SPEC_MAX_BYTES + _FORM_OVERHEAD_BYTES
    refuse_declared_length(request, most, limit)
    stored: list[UploadRow] = []
    async with deleted_on_failure(upload.storage, stored):
        form = MultipartStream(request.stream(), boundary)
        rows, spec, webhook = await _read_form(form, upload, stored)
        eval_id = rows["eval_data"].id if "eval_data" in rows else None
        job = new_job(
            upload.tenant, rows["model"].id, rows["data"].id, eval_id, spec, webhook_url=webhook
        )
        await run_in_threadpool(insert_rows, upload.session, stored, job)
    return job


@router.post("", status_code=202, response_model=JobPublic, openapi_extra=_JOB_BODY)
async def create_job(
    request: Request, response: Response, upload: UploadContextDep, enqueue: EnqueueDep
) -> JobPublic:
    """Queue a job; poll ``Location`` for its progress.

    Either a JSON :class:`JobCreate` naming an uploaded model and dataset, or a
    ``multipart/form-data`` form with the files (``model``, ``data``, optional ``eval_data``)
    and ``spec`` (the job spec as JSON): the files are stored as a model and datasets, exactly
    as ``POST /v1/models`` and ``POST /v1/datasets`` would (the job names their ids), and
    nothing is kept when any part is refused.

    ``webhook_url`` (a JSON field, or a form part): once the job is final (succeeded, failed or
    cancelled) the workers POST it there, signed with ``X-MPQ-Signature`` and retried until a
    2xx answer; see :mod:`mpq_service.webhooks`. Follow a job live with
    ``GET /v1/jobs/{id}/events``.
    """
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise _invalid("malformed multipart body: no boundary in Content-Type")
        job = await _create_from_form(request, boundary, upload)
    elif ctype in (b"", b"application/json") or ctype.endswith(b"+json"):
        body = _parse_json_body(await _read_json_body(request))
        spec = body.job_spec()
        check_webhook(body.webhook_url, upload.settings)
        job = await run_in_threadpool(_insert_job, upload.session, upload.tenant, body, spec)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the job as application/json, or as multipart/form-data with the files",
        )
    await run_in_threadpool(enqueue_job, upload.session, job, enqueue)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    _retry_after(response, job)
    return JobPublic.of(job)


IdQuery = Annotated[str | None, Query(max_length=36)]
TimeQuery = Annotated[datetime | None, Query()]


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    model_id: Annotated[IdQuery, Query(description="only jobs on this model")] = None,
    dataset_id: Annotated[
        IdQuery, Query(description="only jobs on this dataset (calibration or evaluation)")
    ] = None,
    created_after: Annotated[
        TimeQuery, Query(description="only jobs created at or after this time (ISO 8601)")
    ] = None,
    created_before: Annotated[
        TimeQuery, Query(description="only jobs created before this time (ISO 8601)")
    ] = None,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> JobList:
    """The tenant's job history, newest first, one page at a time; ``total`` counts every job
    that matches the filters (on all pages)."""
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    if model_id is not None:
        stmt = stmt.where(Job.model_id == model_id)
    if dataset_id is not None:
        stmt = stmt.where(or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id))
    if created_after is not None:
        stmt = stmt.where(Job.created_at >= _aware(created_after, "created_after"))
    if created_before is not None:
        stmt = stmt.where(Job.created_at < _aware(created_before, "created_before"))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows, next_cursor = page(session, stmt, Job.created_at, Job.id, limit, cursor)
    return JobList(items=[JobPublic.of(j) for j in rows], next_cursor=next_cursor, total=total)


def _aware(when: datetime, name: str) -> datetime:
    """``when`` in UTC; a time without a zone is refused rather than guessed."""
    if when.tzinfo is None:
        raise _invalid(f"{name}: give a time zone (e.g. 2026-12-01T00:00:00Z)")
    try:
        return when.astimezone(timezone.utc)
    except OverflowError:
        raise _invalid(f"{name}: out of range") from None


@router.get("/{job_id}", response_model=JobPublic)
def get_job(
    job_id: str, response: Response, session: SessionDep, tenant: CurrentTenant
) -> JobPublic:
    """The job's status, stage, progress, error and result; ``Retry-After`` until it ends."""
    job = get_owned(session, Job, job_id, tenant)
    _retry_after(response, job)
    return JobPublic.of(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """Cancel a queued or running job (a running one stops at its next checkpoint); 409 once
    it has finished."""
    cancelled = actions.cancel_job(session, job_id, tenant)
    job = get_owned(session, Job, job_id, tenant)
    session.refresh(job)
    if not cancelled:
        raise Conflict("job_finished", f"job {job_id!r} has already ended ({job.status})")
    return JobPublic.of(job)


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job(
    job_id: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep
) -> Response:
    """Delete a job, its artifact rows and their stored files; a queued or running job is
    cancelled first (its worker stops at its next checkpoint and cleans up after itself)."""
    actions.delete_job(session, storage, job_id, tenant)
    return Response(status_code=204)
