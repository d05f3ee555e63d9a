"""The job history and the job page, their live-update JSON, cancelling, and downloading a
job's artefacts with the session cookie. Every query is the tenant's: rows come through the
JSON API's own functions (:func:`api.routes.jobs.list_jobs`, :func:`api.ownership.get_owned`,
:func:`api.routes.artifacts.download_artifact`), so a foreign id is the same 404 as there."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import actions
from api.deps import SessionDep, StorageDep
from api.errors import ApiError
from api.ownership import get_owned
from api.pages import charts, present
from api.pages.session import CheckedTenant, CookieTenant, PageTenant
from api.pages.web import PREFIX, page_router, render
from api.routes import jobs as job_routes
from api.routes.artifacts import artifact_response
from api.routing import SessionReleasingRoute
from api.schemas import JobPublic
from mpq_core.layers import FLOAT_BITS
from mpq_service.job_status import JOB_STATUSES, JobStatus
from mpq_service.storage import Storage
from mpq_service.tables import Artifact, Dataset, Job, ModelFile, Tenant

__all__ = ["live_router", "router"]

log = logging.getLogger(__name__)

router = page_router()
# The JSON endpoints polled by the pages' script: errors stay JSON (401 without a cookie).
live_router = APIRouter(prefix=PREFIX, route_class=SessionReleasingRoute, include_in_schema=False)

PAGE_SIZE = 20
_MAX_LIVE_IDS = 100
_MAX_ALLOCATION_BYTES = 8 * 1024 * 1024
# The worker's plots shown as images on the job page (the bits per layer are drawn inline).
_PLOTS = (("sensitivity.svg", "Sensitivity heatmap"), ("curve.svg", "Trade-off curve"))
_METRICS = ("loss", "accuracy", "perplexity", "cosine", "sqnr_db")


def _names(session: Session, table: type[ModelFile] | type[Dataset], tenant: Tenant) -> dict:
    rows = session.execute(
        select(table.id, table.filename).where(table.tenant_id == tenant.id)
    ).all()
    return {ident: name for ident, name in rows}


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: SessionDep,
    tenant: PageTenant,
    status: str = "",
    model: str = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The tenant's job history, newest first, filtered by status and model, a page at a time."""
    if status and status not in JOB_STATUSES:
        raise ApiError(422, "invalid_request", f"unknown status {status!r}")
    listed = job_routes.list_jobs(
        session,
        tenant,
        status=JobStatus(status) if status else None,
        model_id=model[:36] or None,
        limit=PAGE_SIZE,
        cursor=cursor or None,
    )
    context = {
        "jobs": [present.job_summary(j) | {"model_id": j.model_id} for j in listed.items],
        "models": _names(session, ModelFile, tenant),
        "statuses": JOB_STATUSES,
        "status": status,
        "model": model,
        "next_cursor": listed.next_cursor,
        "total": listed.total,
        "first_page": not cursor,
    }
    return render(request, "jobs.html", context)


@live_router.get("/jobs/live")
def jobs_live(
    session: SessionDep, tenant: CookieTenant, ids: Annotated[str, Query(max_length=4000)] = ""
) -> dict[str, Any]:
    """The summaries of the tenant's jobs among ``ids`` (comma-separated): the history's live
    updates. Ids of other tenants, or of no job, are left out."""
    wanted = [i for i in ids.split(",") if i][:_MAX_LIVE_IDS]
    rows = session.scalars(select(Job).where(Job.tenant_id == tenant.id, Job.id.in_(wanted)))
    return {"items": [present.job_summary(JobPublic.of(j)) for j in rows]}


@live_router.get("/jobs/{job_id}/state")
def job_state(job_id: str, session: SessionDep, tenant: CookieTenant) -> dict[str, Any]:
    """The job's summary and stage timeline: the job page's live updates."""
    job = JobPublic.of(get_owned(session, Job, job_id, tenant))
    return {**present.job_summary(job), "timeline": present.stage_timeline(job)}


def _allocation_doc(storage: Storage, artifact: Artifact | None) -> dict[str, Any] | None:
    """``allocation.json`` of the job (per-layer bits and parameter counts), or None when it is
    missing, too large or unreadable: the chart then falls back to the result's bits."""
    if artifact is None or artifact.size > _MAX_ALLOCATION_BYTES:
        return None
    try:
        doc = json.loads(storage.read_bytes(artifact.storage_key))
    except Exception as exc:  # a chart is a convenience: the page stands without it
        log.warning("allocation.json of job %s not read: %s", artifact.job_id, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _chart(job: JobPublic, storage: Storage, rows: dict[str, Artifact]) -> Any:
    if not job.result or not isinstance(job.result.get("allocation"), dict):
        return None
    doc = _allocation_doc(storage, rows.get("allocation.json"))
    bars = charts.layer_rows(doc, job.result["allocation"])
    candidates = [b for b in job.spec.get("bits", []) if b != FLOAT_BITS] or [8]
    return charts.bits_chart(bars, max(candidates)) if bars else None


def _metric_rows(result: dict[str, Any] | None) -> list[dict[str, str]]:
    metrics = (result or {}).get("metrics") or {}
    rows = []
    for name in _METRICS:
        values = {k: (metrics.get(k) or {}).get(name) for k in ("float", "quantized", "finetuned")}
        if any(v is not None for v in values.values()):
            rows.append(
                {"name": name} | {k: present.format_metric(v, name) for k, v in values.items()}
            )
    return rows


@router.get("/jobs/{job_id}")
def job_page(
    request: Request, job_id: str, session: SessionDep, tenant: PageTenant, storage: StorageDep
) -> Response:
    """One job: stage timeline, error, allocation chart, plots, metrics, downloads."""
    row = get_owned(session, Job, job_id, tenant)
    job = JobPublic.of(row)
    artifacts = session.scalars(
        select(Artifact).where(Artifact.job_id == row.id).order_by(Artifact.name)
    ).all()
    by_name = {a.name: a for a in artifacts}
    context = {
        "job": job,
        "summary": present.job_summary(job),
        "timeline": present.stage_timeline(job),
        "model_name": row.model.filename if row.model else None,
        "dataset_name": row.dataset.filename if row.dataset else None,
        "eval_name": row.eval_dataset.filename if row.eval_dataset else None,
        "artifacts": artifacts,
        "chart": _chart(job, storage, by_name),
        "plots": [(name, title) for name, title in _PLOTS if name in by_name],
        "metric_rows": _metric_rows(job.result),
        "budgets": (job.result or {}).get("budgets") or [],
        "sizes": (job.result or {}).get("sizes") or {},
        "spec_json": json.dumps(job.spec, indent=2, sort_keys=True),
    }
    return render(request, "job.html", context)


@router.get("/jobs/{job_id}/artifacts/{name}")
def job_artifact(
    request: Request,
    job_id: str,
    name: str,
    session: SessionDep,
    tenant: PageTenant,
    storage: StorageDep,
) -> Response:
    """One artefact, exactly as ``GET /v1/jobs/{id}/artifacts/{name}`` serves it (ETag, ranges,
    or a 307 to a presigned URL)."""
    job = get_owned(session, Job, job_id, tenant)
    return artifact_response(request, session, storage, job, name)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, session: SessionDep, tenant: CheckedTenant) -> Response:
    """Cancel a queued or running job (one that has ended stays as it is)."""
    actions.cancel_job(session, job_id, tenant)
    return RedirectResponse(f"{PREFIX}/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/delete")
def delete(
    job_id: str, session: SessionDep, tenant: CheckedTenant, storage: StorageDep
) -> Response:
    """Delete the job and its artefacts (cancelled first if it still runs), as the API does."""
    actions.delete_job(session, storage, job_id, tenant)
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


@router.get("/")
def home(_tenant: PageTenant) -> Response:
    """The pages start at the job history (signed out: the sign-in page)."""
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)
