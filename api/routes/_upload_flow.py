"""The one upload flow of the routes, for ``POST /v1/models``, ``POST /v1/datasets`` and each file
of the multipart ``POST /v1/jobs``: stream the file to storage under its key (sha256 and size
limit on the way, :mod:`api.upload_stream`), sniff its container (:mod:`api.sniffing`), make its
row, insert it, and delete the stored object again whenever the upload is refused or not saved.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import UploadContext
from api.sniffing import sniff_data_format, sniff_model_format
from api.upload_stream import UploadResult, UploadTooLarge, receive_upload
from mpq_service import storage_keys
from mpq_service.storage import Storage
from mpq_service.tables import Dataset, ModelFile, new_id

__all__ = [
    "DATASET_UPLOAD",
    "MODEL_UPLOAD",
    "RAW_BODY",
    "FilenameQuery",
    "UploadKind",
    "UploadRow",
    "clean_filename",
    "deleted_on_failure",
    "insert_rows",
    "refuse_declared_length",
    "store_file",
    "upload_file",
]

log = logging.getLogger(__name__)

FilenameQuery = Annotated[
    str | None, Query(max_length=1000, description="the file's name, kept for downloads")
]

# OpenAPI: the body is the file itself, not JSON or a form.
RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

Row = TypeVar("Row", ModelFile, Dataset)
UploadRow = ModelFile | Dataset


@dataclass(frozen=True)
class UploadKind(Generic[Row]):
    """What differs between uploading a model and a data file."""

    table: type[Row]
    storage_key: Callable[[str, str], str]  # (tenant id, row id) -> object key
    sniff: Callable[[UploadResult], str]  # the format, or raises the MpqError refusing it
    default_filename: str


MODEL_UPLOAD = UploadKind(
    ModelFile, storage_keys.model_key, lambda r: sniff_model_format(r.head), "model.pt"
)
DATASET_UPLOAD = UploadKind(
    Dataset, storage_keys.dataset_key, lambda r: sniff_data_format(r.head, r.size), "data.npz"
)


def clean_filename(name: str | None, default: str) -> str:
    """The last path segment of ``name``, without control characters, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[-255:] if base not in ("", ".", "..") else default


def refuse_declared_length(request: Request, most: int, limit: int) -> None:
    """Refuse before reading a byte a body whose declared length is over ``most``.

    Raises:
        UploadTooLarge: (naming the per-file ``limit``) when ``Content-Length`` is over ``most``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > most:
        raise UploadTooLarge(limit)


async def store_file(
    stream: AsyncIterable[bytes], kind: UploadKind[Row], ctx: UploadContext, filename: str | None
) -> Row:
    """Store ``stream`` (one file's bytes) as a new ``kind`` of the tenant and return its row,
    not yet added to a session.

    Raises:
        UploadTooLarge: the stream is over ``settings.max_upload_bytes`` (nothing is stored).
        MpqError: ``kind.sniff`` refused the content; the stored object was deleted.
    """
    row_id, tenant_id, storage = new_id(), ctx.tenant.id, ctx.storage
    key = kind.storage_key(tenant_id, row_id)
    result = await receive_upload(stream, storage, key, ctx.settings.max_upload_bytes)
    try:
        fmt = kind.sniff(result)
    except BaseException:
        await _delete_quietly(storage, key)
        raise
    return kind.table(
        id=row_id,
        tenant_id=tenant_id,
        filename=clean_filename(filename, kind.default_filename),
        format=fmt,
        size=result.size,
        sha256=result.sha256,
        storage_key=key,
    )


async def _delete_quietly(storage: Storage, key: str) -> None:
    """Delete ``key`` in a thread (a storage in trouble retries, which must not stall the event
    loop); a failure is logged in one line, never raised over the error being handled."""
    try:
        await run_in_threadpool(storage.delete, key)
    except Exception as exc:
        log.warning("could not delete the object %s of a failed upload: %s", key, exc)


@asynccontextmanager
async def deleted_on_failure(storage: Storage, stored: list[UploadRow]) -> AsyncIterator[None]:
    """Delete the stored objects of the rows in ``stored`` (filled inside the block) if the block
    fails, so a refused or unsaved upload (the client went away, the database is down) leaves
    nothing behind."""
    try:
        yield
    except BaseException:
        for row in stored:
            await _delete_quietly(storage, row.storage_key)
        raise


def insert_rows(session: Session, rows: Sequence[UploadRow], *dependents: object) -> None:
    """Insert upload rows, then what refers to them (e.g. the job naming them), in one
    transaction."""
    session.add_all(rows)
    session.flush()  # the uploads before what references them
    session.add_all(dependents)
    session.commit()


async def upload_file(
    request: Request, kind: UploadKind[Row], ctx: UploadContext, filename: str | None
) -> Row:
    """Store the request body (the file itself) as a new ``kind`` of the tenant and insert its
    row; nothing is kept when the upload is refused or the row cannot be saved.

    Raises:
        UploadTooLarge: the body is over ``settings.max_upload_bytes``.
        MpqError: the content was refused (see :data:`MODEL_UPLOAD`, :data:`DATASET_UPLOAD`).
    """
    limit = ctx.settings.max_upload_bytes
    refuse_declared_length(request, limit, limit)
    stored: list[UploadRow] = []
    async with deleted_on_failure(ctx.storage, stored):
        row = await store_file(request.stream(), kind, ctx, filename)
        stored.append(row)
        await run_in_threadpool(insert_rows, ctx.session, stored)
    return row
