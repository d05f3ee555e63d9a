"""``/v1/models``: upload a model (the raw body), get one, list them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from api import actions
from api.deps import CurrentTenant, SessionDep, StorageDep, UploadContextDep
from api.ownership import get_owned
from api.routes._paging import CursorQuery, LimitQuery, page
from api.routes._upload_flow import MODEL_UPLOAD, RAW_BODY, FilenameQuery, upload_file
from api.routing import SessionReleasingRoute
from api.schemas import ModelList, ModelPublic
from mpq_service.tables import ModelFile

router = APIRouter(prefix="/models", tags=["models"], route_class=SessionReleasingRoute)


@router.post("", status_code=201, response_model=ModelPublic, openapi_extra=RAW_BODY)
async def upload_model(
    request: Request,
    response: Response,
    upload: UploadContextDep,
    filename: FilenameQuery = None,
) -> ModelPublic:
    """Upload a TorchScript archive or torch.export program as the raw request body,
    or as the part ``file`` of a ``multipart/form-data`` form (``curl -F file=@model.pt``).

    Pickles (``torch.save``) are refused with ``model_pickle``; other files with
    ``model_format``. The worker validates the complete file when a job uses it.
    """
    row = await upload_file(request, MODEL_UPLOAD, upload, filename)
    response.headers["Location"] = f"/v1/models/{row.id}"
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
    return ModelPublic.of(get_owned(session, ModelFile, model_id, tenant))


@router.delete("/{model_id}", status_code=204, response_class=Response)
def delete_model(
    model_id: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep
) -> Response:
    """Delete the model and its stored file; 409 ``in_use`` while a queued or running job uses
    it. Jobs that used it and have ended stay in the history, with ``model_id`` null."""
    actions.delete_upload(session, storage, ModelFile, model_id, tenant)
    return Response(status_code=204)
