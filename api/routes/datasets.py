"""``/v1/datasets``: upload a calibration or evaluation data file (the raw body), get one, list them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from api import actions
from api.deps import CurrentTenant, SessionDep, StorageDep, UploadContextDep
from api.ownership import get_owned
from api.routes._paging import CursorQuery, LimitQuery, page
from api.routes._upload_flow import DATASET_UPLOAD, RAW_BODY, FilenameQuery, upload_file
from api.routing import SessionReleasingRoute
from api.schemas import DatasetList, DatasetPublic
from mpq_service.tables import Dataset

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=SessionReleasingRoute)


@router.post("", status_code=201, response_model=DatasetPublic, openapi_extra=RAW_BODY)
async def upload_dataset(
    request: Request,
    response: Response,
    upload: UploadContextDep,
    filename: FilenameQuery = None,
) -> DatasetPublic:
    """Upload a ``.npz`` or ``.safetensors`` data file as the raw request body,
    or as the part ``file`` of a ``multipart/form-data`` form (``curl -F file=@calib.npz``).

    Object (pickled) arrays are refused with ``data_pickle``; other files with ``data_format``.
    The worker checks the arrays themselves when a job uses them.
    """
    row = await upload_file(request, DATASET_UPLOAD, upload, filename)
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetPublic.of(row)


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep, tenant: CurrentTenant, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> DatasetList:
    """The tenant's datasets, newest first."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant.id)
    rows, next_cursor = page(session, stmt, Dataset.created_at, Dataset.id, limit, cursor)
    return DatasetList(items=[DatasetPublic.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    return DatasetPublic.of(get_owned(session, Dataset, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(
    dataset_id: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep
) -> Response:
    """Delete the dataset and its stored file; 409 ``in_use`` while a queued or running job uses
    it. Jobs that used it and have ended stay in the history, with ``dataset_id`` null."""
    actions.delete_upload(session, storage, Dataset, dataset_id, tenant)
    return Response(status_code=204)
