"""One JSON error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Codes are stable (clients match on them); messages say what to fix. 4xx are the caller's
mistakes; an unexpected exception is a 500 ``internal_error`` with no details (it is logged).
Another tenant's resource is always ``404 not_found``, exactly like a missing one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.upload_stream import UploadTooLarge
from mpq_core.errors import (
    BudgetInfeasible,
    DataError,
    DataMismatch,
    ModelFormatError,
    MpqError,
    SpecError,
)

__all__ = [
    "ApiError",
    "Conflict",
    "NotFound",
    "Unauthorized",
    "error_body",
    "error_response",
    "install_error_handlers",
    "mpq_error_status",
]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class NotFound(ApiError):
    """404 ``not_found``: missing, or owned by another tenant (never told apart)."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(404, "not_found", f"{what} {ident!r} not found")


class Conflict(ApiError):
    """409: the resource's state does not allow the request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(409, code, message)


class Unauthorized(ApiError):
    """401 ``unauthorized``: no API key, or an unknown or revoked one."""

    def __init__(self, message: str = "a valid API key is required") -> None:
        super().__init__(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def mpq_error_status(exc: MpqError) -> int:
    """The HTTP status of an :class:`MpqError` raised by the caller's input."""
    if isinstance(exc, UploadTooLarge):
        return 413
    if isinstance(exc, (ModelFormatError, DataError)):
        return 415  # the upload is not a container mpq reads
    if isinstance(exc, (SpecError, BudgetInfeasible, DataMismatch)):
        return 422
    return 400


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _mpq_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MpqError)
    return error_response(mpq_error_status(exc), exc.code, exc.message)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", _validation_message(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised in ``app`` with the one JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(MpqError, _mpq_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
