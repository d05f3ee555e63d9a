"""The one ownership check of the API: a tenant's row by id, else 404.

A missing row and another tenant's row answer the same ``404 not_found``, so ids cannot be
probed across tenants.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from api.errors import NotFound
from mpq_service.tables import Dataset, Job, ModelFile, Tenant

__all__ = ["get_owned"]

Owned = TypeVar("Owned", ModelFile, Dataset, Job)

# What a 404 calls each kind of row ("model 'abc' not found").
_NOUNS: dict[type, str] = {ModelFile: "model", Dataset: "dataset", Job: "job"}


def get_owned(session: Session, table: type[Owned], ident: str, tenant: Tenant) -> Owned:
    """The row ``ident`` of ``table`` owned by ``tenant``.

    Raises:
        NotFound: no such row, or it belongs to another tenant (never told apart).

    Example:
        >>> job = get_owned(session, Job, job_id, tenant)
    """
    if "\x00" in ident:  # no id holds one, and Postgres refuses text that does
        raise NotFound(_NOUNS[table], ident)
    row = session.get(table, ident)
    if row is None or row.tenant_id != tenant.id:
        raise NotFound(_NOUNS[table], ident)
    return row
