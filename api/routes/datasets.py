"""``/v1/datasets``: upload a calibration or evaluation data file (the raw body), get one, list them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.errors import NotFound
from api.routes._paging import CursorQuery, LimitQuery, page
from api.routes._upload import RAW_BODY, FilenameQuery, clean_filename, store_upload
from api.schemas import DatasetList, DatasetPublic
from api.uploads import sniff_data_format
from mpq_service.tables import Dataset, new_id

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetPublic, openapi_extra=RAW_BODY)
async def upload_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    storage: StorageDep,
    settings: SettingsDep,
    filename: FilenameQuery = None,
) -> DatasetPublic:
    """Upload a ``.npz`` or ``.safetensors`` data file as the raw request body.

    Object (pickled) arrays are refused with ``data_pickle``; other files with ``data_format``.
    The worker checks the arrays themselves when a job uses them.
    """
    dataset_id = new_id()
    key = f"tenants/{tenant.id}/datasets/{dataset_id}"
    result, fmt = await store_upload(
        request, storage, settings, key, lambda r: sniff_data_format(r.head, r.size)
    )
    row = Dataset(
        id=dataset_id,
        tenant_id=tenant.id,
        filename=clean_filename(filename, "data.npz"),
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
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"
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
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound("dataset", dataset_id)
    return DatasetPublic.of(row)
