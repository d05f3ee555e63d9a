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
from python_multipart.multipart import parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import UploadContext
from api.errors import ApiError
from api.multipart import MultipartStream
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

# OpenAPI: the body is the file itself, or a form whose one part ``file`` is.
RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
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
    default_filename: Callable[[str], str]  # the name of an unnamed upload of this format


MODEL_UPLOAD = UploadKind(
    ModelFile,
    storage_keys.model_key,
    lambda r: sniff_model_format(r.head),
    # Detected, not assumed: a torch.export program keeps the suffix torch.export.load expects.
    lambda fmt: "model.pt2" if fmt == "export" else "model.pt",
)
DATASET_UPLOAD = UploadKind(
    Dataset,
    storage_keys.dataset_key,
    lambda r: sniff_data_format(r.head, r.size),
    lambda fmt: "data.npz",
)
# What a multipart form adds around its file (boundaries, part headers): allowed on top of the
# file's own limit when the declared length is checked before reading.
_FORM_SLACK = 64 * 1024


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
        filename=clean_filename(filename, kind.default_filename(fmt)),
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
    """Store the uploaded file as a new ``kind`` of the tenant and insert its row; nothing is
    kept when the upload is refused or the row cannot be saved.

    The file is the request body itself, or the one part named ``file`` of a
    ``multipart/form-data`` body (``curl -F file=@model.pt``), whose file name is used when no
    ``filename`` is given.

    Raises:
        UploadTooLarge: the file is over ``settings.max_upload_bytes``.
        ApiError: a multipart body without exactly one ``file`` part (422 ``invalid_request``).
        MpqError: the content was refused (see :data:`MODEL_UPLOAD`, :data:`DATASET_UPLOAD`).
    """
    limit = ctx.settings.max_upload_bytes
    ctype, params = parse_options_header(request.headers.get("content-type"))
    form = None
    if ctype == b"multipart/form-data":
        refuse_declared_length(request, limit + _FORM_SLACK, limit)
        form, part_name = await _file_part(request, params.get(b"boundary"))
        filename = filename or part_name
        body: AsyncIterable[bytes] = form.read()
    else:
        refuse_declared_length(request, limit, limit)
        body = request.stream()
    stored: list[UploadRow] = []
    async with deleted_on_failure(ctx.storage, stored):
        row = await store_file(body, kind, ctx, filename)
        stored.append(row)
        if form is not None and await form.next_part() is not None:
            raise _one_file_part()
        await run_in_threadpool(insert_rows, ctx.session, stored)
    return row


def _one_file_part() -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        "a multipart upload holds exactly one part, named 'file' (curl -F file=@model.pt)",
    )


async def _file_part(
    request: Request, boundary: bytes | None
) -> tuple[MultipartStream, str | None]:
    """The multipart body positioned at its ``file`` part, and that part's file name."""
    if not boundary:
        raise ApiError(422, "invalid_request", "malformed multipart body: no boundary")
    form = MultipartStream(request.stream(), boundary)
    part = await form.next_part()
    if part is None or part.name != "file":
        raise _one_file_part()
    return form, part.filename
