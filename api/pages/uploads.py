"""The models and datasets pages: the tenant's uploads, a link to reuse each in a new job, and
deleting one (through :func:`api.actions.delete_upload`, the JSON API's rule: an upload a
queued or running job uses is a 409 page)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from api import actions
from api.deps import SessionDep, StorageDep
from api.pages.session import CheckedTenant, PageTenant
from api.pages.web import PREFIX, page_router, render
from mpq_service.tables import Dataset, ModelFile

__all__ = ["router"]

router = page_router()

_LIMIT = 200


@dataclass(frozen=True)
class _Kind:
    table: type[ModelFile] | type[Dataset]
    path: str  # under /ui, and the JSON API's plural
    title: str
    reuse_param: str  # the submit page's query parameter that preselects one


_KINDS = {
    "models": _Kind(ModelFile, "models", "Models", "model_id"),
    "datasets": _Kind(Dataset, "datasets", "Datasets", "dataset_id"),
}


def _page(request: Request, session: SessionDep, tenant: PageTenant, kind: _Kind) -> Response:
    stmt = (
        select(kind.table)
        .where(kind.table.tenant_id == tenant.id)
        .order_by(kind.table.created_at.desc(), kind.table.id.desc())
        .limit(_LIMIT)
    )
    rows = session.scalars(stmt).all()
    return render(request, "uploads.html", {"kind": kind, "rows": rows, "limit": _LIMIT})


@router.get("/models")
def models_page(request: Request, session: SessionDep, tenant: PageTenant) -> Response:
    """The tenant's models, newest first."""
    return _page(request, session, tenant, _KINDS["models"])


@router.get("/datasets")
def datasets_page(request: Request, session: SessionDep, tenant: PageTenant) -> Response:
    """The tenant's datasets, newest first."""
    return _page(request, session, tenant, _KINDS["datasets"])


@router.post("/models/{ident}/delete")
def delete_model(
    ident: str, session: SessionDep, tenant: CheckedTenant, storage: StorageDep
) -> Response:
    actions.delete_upload(session, storage, ModelFile, ident, tenant)
    return RedirectResponse(f"{PREFIX}/models", status_code=303)


@router.post("/datasets/{ident}/delete")
def delete_dataset(
    ident: str, session: SessionDep, tenant: CheckedTenant, storage: StorageDep
) -> Response:
    actions.delete_upload(session, storage, Dataset, ident, tenant)
    return RedirectResponse(f"{PREFIX}/datasets", status_code=303)
