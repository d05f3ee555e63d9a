"""One JSON error shape for every failure: ``{"error": {"code", "message", "request_id"}}``.

``request_id`` is the request's id (:mod:`api.request_id`), also in the ``X-Request-ID`` header:
quoting it finds the request's log lines.

Codes are stable (clients match on them); messages say what to fix. 4xx are the caller's
mistakes; an unexpected exception is a 500 ``internal_error`` with no details (it is logged).
Another tenant's resource is always ``404 not_found``, exactly like a missing one.

Outages are not the caller's mistake and not a bug either: a database that cannot be reached
(or has no free connection in time) is ``503 database_unavailable``, a storage that cannot be
reached after its retries ``503 storage_unavailable``, both with ``Retry-After``. A client that
goes away mid-request is logged in one line, not as an error with a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.upload_stream import UploadTooLarge
from mpq_core.errors import (
    BudgetInfeasible,
    DataError,
    DataMismatch,
    ModelFormatError,
    MpqError,
    SpecError,
)
from mpq_service import logs
from mpq_service.storage import StorageUnavailable

__all__ = [
    "OUTAGE_RETRY_AFTER_S",
    "ApiError",
    "Conflict",
    "NotFound",
    "Unauthorized",
    "error_body",
    "error_response",
    "install_error_handlers",
    "is_database_outage",
    "mpq_error_status",
]

# Under "mpq", whose INFO messages `mpq serve` shows (api.cli sets it up); a plain uvicorn run
# shows its warnings and errors through logging's last-resort handler.
log = logging.getLogger("mpq.api.errors")

OUTAGE_RETRY_AFTER_S = 5  # the Retry-After of a 503 for an outage


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
    """The error envelope; with the request's id while a request is served."""
    error = {"code": code, "message": message}
    rid = logs.request_id.get()
    if rid is not None:
        error["request_id"] = rid
    return {"error": error}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer; it carries ``X-Request-ID`` itself because an unhandled error's 500 is
    sent by Starlette outside the request-id middleware."""
    all_headers = dict(headers or {})
    rid = logs.request_id.get()
    if rid is not None:
        all_headers.setdefault("X-Request-ID", rid)
    return JSONResponse(error_body(code, message), status_code=status, headers=all_headers)


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


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc  # the driver's own error, without the SQL
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"


def _outage(code: str, message: str) -> JSONResponse:
    return error_response(503, code, message, {"Retry-After": str(OUTAGE_RETRY_AFTER_S)})


def is_database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable, failing or out of free connections
    (rather than a bug in a query or a constraint the caller broke)."""
    if isinstance(exc, sa_exc.TimeoutError):  # no free connection in the pool in time
        return True
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


async def _database_error(request: Request, exc: Exception) -> Response:
    if not is_database_outage(exc):
        return await _unexpected(request, exc)
    log.warning(
        "database unavailable on %s %s: %s", request.method, request.url.path, _first_line(exc)
    )
    return _outage(
        "database_unavailable",
        f"the database is unavailable or overloaded; try again in {OUTAGE_RETRY_AFTER_S} s",
    )


async def _storage_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _outage(
        "storage_unavailable",
        f"the file storage is unavailable; try again in {OUTAGE_RETRY_AFTER_S} s",
    )


async def _client_disconnect(request: Request, _exc: Exception) -> Response:
    # Nothing to answer (nobody listens) and nothing went wrong on our side: what the request
    # had stored was cleaned up on the way out.
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised in ``app`` with the one JSON shape."""
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(StorageUnavailable, _storage_unavailable)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
    app.add_exception_handler(sa_exc.TimeoutError, _database_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(MpqError, _mpq_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
