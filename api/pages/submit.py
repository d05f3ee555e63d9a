"""The submit page: upload a model and data (or reuse uploaded ones), choose budgets and
options, start the job and land on its page.

The form's defaults are read from :class:`mpq_core.spec.JobSpec`'s fields, and what is sent is
turned into a job spec and validated exactly as ``POST /v1/jobs`` validates one: a bad budget
shows the API's own message on the form. The files are streamed to storage through the upload
routes' flow (:func:`api.routes._upload_flow.store_file`: size limit, sha256, sniffing), the job
row is made by :func:`api.routes.jobs.new_job` and queued by :func:`api.routes.jobs.enqueue_job`.
The CSRF token is the form's first part: nothing is stored for a post without it.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from python_multipart.multipart import parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import EnqueueDep, SessionDep, SettingsDep, StorageDep, UploadContext
from api.errors import ApiError, mpq_error_status
from api.multipart import MultipartStream
from api.ownership import get_owned
from api.pages.session import CSRF_FIELD, PageTenant, check_csrf
from api.pages.web import PREFIX, page_router, render
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
from api.routes.jobs import check_webhook, enqueue_job, new_job
from api.schemas import parse_job_spec
from mpq_core.errors import MpqError, SpecError
from mpq_core.spec import AnalysisSpec, FinetuneSpec, Granularity, JobSpec, Method
from mpq_service.tables import Dataset, Job, ModelFile, Tenant

__all__ = ["form_defaults", "router", "spec_from_form"]

router = page_router()

_FILES: dict[str, UploadKind[Any]] = {
    "model": MODEL_UPLOAD,
    "data": DATASET_UPLOAD,
    "eval_data": DATASET_UPLOAD,
}
_CHECKBOXES = ("quantize_activations", "symmetric", "runtime_exports")
_TEXT = (
    "model_id", "dataset_id", "eval_dataset_id", "budgets", "bits", "sweep", "act_bits",
    "granularity", "method", "finetune_epochs", "pins", "ties", "webhook_url", *_CHECKBOXES,
)  # fmt: skip
_FIELD_MAX_BYTES = 64 * 1024
_FORM_OVERHEAD_BYTES = 256 * 1024
_SPLIT = re.compile(r"[,\s]+")


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    assert callable(f.default_factory), f.name
    return f.default_factory()


def _spec_fields(cls: type) -> dict[str, Field[Any]]:
    return {f.name: f for f in fields(cls)}


def form_defaults() -> dict[str, Any]:
    """The form's fields at the job spec's defaults (read from the dataclasses), as shown."""
    top, tune, analysis = (
        _spec_fields(JobSpec), _spec_fields(FinetuneSpec), _spec_fields(AnalysisSpec)
    )  # fmt: skip
    return {
        "budgets": ", ".join(_default(top["budgets"])),
        "bits": ", ".join(str(b) for b in _default(top["bits"])),
        "sweep": ", ".join(_default(top["sweep"])),
        "act_bits": str(_default(top["act_bits"])),
        "granularity": str(_default(top["granularity"])),
        "method": str(_default(analysis["method"])),
        "finetune_epochs": str(_default(tune["epochs"])),
        "pins": "\n".join(f"{k}={v}" for k, v in _default(top["pins"]).items()),
        "ties": "\n".join(_default(top["ties"])),
        "webhook_url": "",
        **{name: bool(_default(top[name])) for name in _CHECKBOXES},
    }


def _help() -> dict[str, str]:
    top = _spec_fields(JobSpec)
    text = {name: f.metadata.get("help", "") for name, f in top.items()}
    text["finetune_epochs"] = _spec_fields(FinetuneSpec)["epochs"].metadata.get("help", "")
    text["method"] = _spec_fields(AnalysisSpec)["method"].metadata.get("help", "")
    text["webhook_url"] = (
        "called once the job has ended (succeeded, failed or cancelled), signed with "
        "X-MPQ-Signature"
    )
    return text


def _number(text: str) -> Any:
    """An int or float when ``text`` reads as one, else the text (the spec names the field)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _items(text: str) -> list[str]:
    return [t for t in _SPLIT.split(text.strip()) if t]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pins(text: str) -> dict[str, Any]:
    """``REGEX=BITS`` lines as the spec's pins (the last ``=`` splits: a pattern may hold one).

    Raises:
        SpecError: a line without ``=``.
    """
    pins: dict[str, Any] = {}
    for line in _lines(text):
        pattern, sep, bits = line.rpartition("=")
        if not sep or not pattern.strip():
            raise SpecError(f"pins: write each pin as REGEX=BITS on its own line, got {line!r:.80}")
        pins[pattern.strip()] = _number(bits.strip())
    return pins


def spec_from_form(values: dict[str, Any]) -> JobSpec:
    """The job spec of the form's ``values`` (checkboxes: present means on), validated as
    ``POST /v1/jobs`` validates one.

    Raises:
        SpecError: (or BudgetError) naming the first bad field, as the API would.
    """
    spec = {
        "budgets": _items(values.get("budgets", "")),
        "bits": [_number(b) for b in _items(values.get("bits", ""))],
        "sweep": _items(values.get("sweep", "")),
        "act_bits": _number(values.get("act_bits", "")),
        "granularity": values.get("granularity", ""),
        "analysis": {"method": values.get("method", "")},
        "finetune": {"epochs": _number(values.get("finetune_epochs", ""))},
        "pins": _pins(values.get("pins", "")),
        "ties": _lines(values.get("ties", "")),
        **{name: bool(values.get(name)) for name in _CHECKBOXES},
    }
    return parse_job_spec(spec)


def _uploads(session: Session, table: type[ModelFile] | type[Dataset], tenant: Tenant) -> list:
    stmt = select(table).where(table.tenant_id == tenant.id).order_by(table.created_at.desc())
    return list(session.scalars(stmt.limit(200)).all())


def _form_page(
    request: Request,
    session: Session,
    tenant: Tenant,
    values: dict[str, Any],
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    context = {
        "values": values,
        "help": _help(),
        "models": _uploads(session, ModelFile, tenant),
        "datasets": _uploads(session, Dataset, tenant),
        "granularities": [g.value for g in Granularity],
        "methods": [m.value for m in Method],
        "error": error,
    }
    return render(request, "submit.html", context, status_code=status_code)


@router.get("/jobs/new")
def submit_page(
    request: Request,
    session: SessionDep,
    tenant: PageTenant,
    model_id: str = "",
    dataset_id: str = "",
) -> Response:
    """The form, at the spec's defaults; ``model_id`` / ``dataset_id`` preselect an upload."""
    values = form_defaults() | {"model_id": model_id[:36], "dataset_id": dataset_id[:36]}
    return _form_page(request, session, tenant, values)


Upload = TypeVar("Upload", ModelFile, Dataset)


def _chosen(
    session: Session,
    tenant: Tenant,
    table: type[Upload],
    uploaded: UploadRow | None,
    ident: str,
) -> str | None:
    """The id of the uploaded file, else of the chosen upload (the tenant's, else 404)."""
    if uploaded is not None:
        return uploaded.id
    return get_owned(session, table, ident, tenant).id if ident else None


def _insert_job(
    upload: UploadContext, values: dict[str, Any], files: dict[str, UploadRow], spec: JobSpec
) -> Job:
    session, tenant = upload.session, upload.tenant
    model_id = _chosen(session, tenant, ModelFile, files.get("model"), values.get("model_id", ""))
    data_id = _chosen(session, tenant, Dataset, files.get("data"), values.get("dataset_id", ""))
    if model_id is None or data_id is None:
        raise ApiError(422, "invalid_request", "choose or upload a model and calibration data")
    eval_id = _chosen(
        session, tenant, Dataset, files.get("eval_data"), values.get("eval_dataset_id", "")
    )
    webhook = check_webhook(values.get("webhook_url", "").strip() or None, upload.settings)
    job = new_job(tenant, model_id, data_id, eval_id, spec, webhook_url=webhook)
    insert_rows(session, list(files.values()), job)
    return job


async def _read_form(
    form: MultipartStream, upload: UploadContext, stored: list[UploadRow], values: dict[str, Any]
) -> dict[str, UploadRow]:
    """The form's files stored as uploads (each also appended to ``stored``); its text fields
    go into ``values``. The spec is checked before the first file is stored: the form sends its
    text fields first, so a bad budget costs no upload."""
    files: dict[str, UploadRow] = {}
    while (part := await form.next_part()) is not None:
        if part.filename is None and part.name in _TEXT:
            raw = await form.read_field(_FIELD_MAX_BYTES, part.name)
            values[part.name] = raw.decode("utf-8", "replace")
            continue
        if part.name not in _FILES or part.name in files:
            raise ApiError(422, "invalid_request", f"unexpected form field {part.name!r}")
        if not part.filename:
            continue  # no file chosen: the browser sends an empty part
        if not files:
            spec_from_form(values)
        row = await store_file(form.read(), _FILES[part.name], upload, part.filename)
        stored.append(row)
        files[part.name] = row
    return files


async def _csrf_part(request: Request, form: MultipartStream) -> None:
    part = await form.next_part()
    token = None
    if part is not None and part.name == CSRF_FIELD:
        token = (await form.read_field(1024, CSRF_FIELD)).decode("ascii", "replace")
    check_csrf(request, token)


async def _drain(form: MultipartStream) -> None:
    """Read what is left of the body, so the browser sees the answer, not a reset connection."""
    try:
        while await form.next_part() is not None:
            pass
    except ApiError:
        pass


@router.post("/jobs/new")
async def submit(
    request: Request,
    session: SessionDep,
    tenant: PageTenant,
    storage: StorageDep,
    settings: SettingsDep,
    enqueue: EnqueueDep,
) -> Response:
    """Store the files, create and queue the job, go to its page; a refused form is shown
    again with the API's message (and nothing it uploaded is kept)."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(415, "unsupported_media_type", "send the form as multipart/form-data")
    limit = settings.max_upload_bytes
    refuse_declared_length(request, len(_FILES) * limit + _FORM_OVERHEAD_BYTES, limit)
    form = MultipartStream(request.stream(), params[b"boundary"])
    await _csrf_part(request, form)
    upload = UploadContext(session, tenant, storage, settings)
    stored: list[UploadRow] = []
    values: dict[str, Any] = {}
    try:
        async with deleted_on_failure(storage, stored):
            files = await _read_form(form, upload, stored, values)
            spec = spec_from_form(values)
            job = await run_in_threadpool(_insert_job, upload, values, files, spec)
    except (ApiError, MpqError) as exc:
        await _drain(form)
        await run_in_threadpool(session.rollback)
        status = exc.status if isinstance(exc, ApiError) else mpq_error_status(exc)
        shown = form_defaults() | {k: False for k in _CHECKBOXES} | values
        return await run_in_threadpool(
            _form_page, request, session, tenant, shown, exc.message, status
        )
    await run_in_threadpool(enqueue_job, session, job, enqueue)
    return RedirectResponse(f"{PREFIX}/jobs/{job.id}", status_code=303)
