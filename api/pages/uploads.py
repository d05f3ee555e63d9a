"""The models and datasets pages: the tenant's uploads, a link to reuse each in a new job, and
deleting one (through :func:`api.actions.delete_upload`, the JSON API's rule: an upload a
queued or running job uses is a 409 page)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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


Upload = TypeVar("Upload", ModelFile, Dataset)


@dataclass(frozen=True)
class _Kind(Generic[Upload]):
    table: type[Upload]
    path: str  # under /ui, and the JSON API's plural
    title: str
    reuse_param: str  # the submit page's query parameter that preselects one


_KINDS: dict[str, _Kind[Any]] = {
    "models": _Kind(ModelFile, "models", "Models", "model_id"),
    "datasets": _Kind(Dataset, "datasets", "Datasets", "dataset_id"),
}


def _lister(kind: _Kind[Any]) -> Callable[..., Response]:
    def page(request: Request, session: SessionDep, tenant: PageTenant) -> Response:
        stmt = (
            select(kind.table)
            .where(kind.table.tenant_id == tenant.id)
            .order_by(kind.table.created_at.desc(), kind.table.id.desc())
            .limit(_LIMIT)
        )
        rows = session.scalars(stmt).all()
        return render(request, "uploads.html", {"kind": kind, "rows": rows, "limit": _LIMIT})

    page.__doc__ = f"The tenant's {kind.path}, newest first."
    return page


def _deleter(kind: _Kind[Any]) -> Callable[..., Response]:
    def delete(
        ident: str, session: SessionDep, tenant: CheckedTenant, storage: StorageDep
    ) -> Response:
        actions.delete_upload(session, storage, kind.table, ident, tenant)
        return RedirectResponse(f"{PREFIX}/{kind.path}", status_code=303)

    delete.__doc__ = f"Delete one of the tenant's {kind.path} (409 while a job uses it)."
    return delete


for _kind in _KINDS.values():
    router.get(f"/{_kind.path}", name=f"{_kind.path}_page")(_lister(_kind))
    router.post(f"/{_kind.path}/{{ident}}/delete", name=f"delete_{_kind.path}")(_deleter(_kind))
