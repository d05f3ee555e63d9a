"""``/v1/models``: upload a model (the raw body), get one, list them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.errors import NotFound
from api.routes._paging import CursorQuery, LimitQuery, page
from api.routes._upload import RAW_BODY, FilenameQuery, clean_filename, store_upload
from api.schemas import ModelList, ModelPublic
from api.uploads import sniff_model_format
from mpq_service.tables import ModelFile, new_id

router = APIRouter(prefix="/models", tags=["models"])


@router.post("", status_code=201, response_model=ModelPublic, openapi_extra=RAW_BODY)
async def upload_model(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    storage: StorageDep,
    settings: SettingsDep,
    filename: FilenameQuery = None,
) -> ModelPublic:
    """Upload a TorchScript archive or torch.export program as the raw request body.

    Pickles (``torch.save``) are refused with ``model_pickle``; other files with
    ``model_format``. The worker validates the complete file when a job uses it.
    """
    model_id = new_id()
    key = f"tenants/{tenant.id}/models/{model_id}"
    result, fmt = await store_upload(
        request, storage, settings, key, lambda r: sniff_model_format(r.head)
    )
    row = ModelFile(
        id=model_id,
        tenant_id=tenant.id,
        filename=clean_filename(filename, "model.pt"),
        format=fmt,
        size=result.size,
        sha256=result.sha256,
        storage_key=key,
    )

    def save() -> None:
        session.add(row)
        session.commit()

    try:
        await run_in_threadpool(save)
    except BaseException:
        storage.delete(key)
        raise
    response.headers["Location"] = f"/v1/models/{model_id}"
    return ModelPublic.of(row)


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep, tenant: CurrentTenant, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> ModelList:
    """The tenant's models, newest first."""
    stmt = select(ModelFile).where(ModelFile.tenant_id == tenant.id)
    rows, next_cursor = page(session, stmt, ModelFile.created_at, ModelFile.id, limit, cursor)
    return ModelList(items=[ModelPublic.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    row = session.get(ModelFile, model_id)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound("model", model_id)
    return ModelPublic.of(row)
