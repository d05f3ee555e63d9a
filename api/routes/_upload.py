"""The upload path shared by models and datasets: stream the raw body to storage (sha256 and
size limit on the way), sniff its container, and remove the object again if it is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Query, Request

from api.settings import Settings
from api.storage import Storage
from api.uploads import UploadResult, UploadTooLarge, receive_upload

__all__ = ["RAW_BODY", "FilenameQuery", "clean_filename", "store_upload"]

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


def clean_filename(name: str | None, default: str) -> str:
    """The last path segment of ``name``, without control characters, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[-255:] if base not in ("", ".", "..") else default


async def store_upload(
    request: Request,
    storage: Storage,
    settings: Settings,
    key: str,
    sniff: Callable[[UploadResult], str],
) -> tuple[UploadResult, str]:
    """Store the request body under ``key`` and return it with the format ``sniff`` found.

    Raises:
        UploadTooLarge: the body is over ``settings.max_upload_bytes`` (nothing is stored).
        MpqError: ``sniff`` refused the content; the stored object was deleted.
    """
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(limit)  # refuse before reading a byte
    result = await receive_upload(request.stream(), storage, key, limit)
    try:
        fmt = sniff(result)
    except BaseException:
        storage.delete(key)
        raise
    return result, fmt
