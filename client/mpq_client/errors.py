"""The client's exceptions: one hierarchy under :class:`MpqClientError`.

An error the API answered is an :class:`MpqApiError` carrying the API's stable ``code`` (match
on it, e.g. ``model_format`` or ``budget_infeasible``), its message and the HTTP status; a
subclass per status where callers want to catch it on its own. A job that ended badly is
:class:`JobFailed` or :class:`JobCancelled`; a wait that ran out of time :class:`WaitTimeout`.

Example::

    try:
        client.job("no-such-id")
    except NotFound as exc:
        print(exc.code)  # not_found
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpq_client.types import Job

__all__ = [
    "Conflict",
    "DownloadCorrupt",
    "InvalidRequest",
    "JobCancelled",
    "JobFailed",
    "MpqApiError",
    "MpqClientError",
    "MpqConnectionError",
    "NotFound",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "api_error",
]


class MpqClientError(Exception):
    """Anything this client raises on purpose."""


class MpqConnectionError(MpqClientError):
    """The service could not be reached (refused, reset, timed out), after the retries of an
    idempotent request."""


class MpqApiError(MpqClientError):
    """The API answered with an error: ``status`` (HTTP), ``code`` (stable, from the body's
    ``{"error": {"code", "message"}}``), ``message`` (what to fix) and the ``request_id`` the
    server gave the request, when it gave one."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status} [{code}] {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class InvalidRequest(MpqApiError):
    """The request was refused for what it carries (400, 413, 415, 422): a bad spec or budget
    (``invalid_request``, ``spec_invalid``, ...), a file that is not a model or data file mpq
    reads (``model_format``, ``data_format``), or one too large (``upload_too_large``)."""


class Unauthorized(MpqApiError):
    """401: no API key, or an unknown or revoked one."""


class NotFound(MpqApiError):
    """404 ``not_found``: no such resource, or it belongs to another tenant."""


class Conflict(MpqApiError):
    """409: the resource's state does not allow it (``job_finished``, ``job_active``,
    ``in_use``)."""


class Unavailable(MpqApiError):
    """503: the service is overloaded or one of its parts is down; ``retry_after`` is the wait
    in seconds the server asked for (None when it did not say)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, request_id)
        self.retry_after = retry_after


class RateLimited(Unavailable):
    """429: too many requests; wait ``retry_after`` seconds."""


class ServerError(MpqApiError):
    """500 and other 5xx: a bug or failure on the server's side (report it with ``request_id``)."""


class DownloadCorrupt(MpqClientError):
    """A downloaded artefact's size or sha256 differs from what the job's artifact list says;
    nothing was written at the destination."""


class JobFailed(MpqClientError):
    """The job ended ``failed``: ``code`` and ``message`` are the job's error (say
    ``budget_infeasible``, ``data_mismatch``); ``job`` is the job as last read."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.code = job.error.code if job.error else "unknown"
        self.message = job.error.message if job.error else "the job failed without an error"
        super().__init__(f"job {job.id} failed: [{self.code}] {self.message}")


class JobCancelled(MpqClientError):
    """The job was cancelled before it finished; ``job`` is the job as last read."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(f"job {job.id} was cancelled")


class WaitTimeout(MpqClientError, TimeoutError):
    """The job had not finished when the wait's timeout passed (it keeps running);
    ``job`` is the job as last read."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(
            f"job {job.id} not finished after {timeout:g} s "
            f"(status {job.status}, stage {job.stage}, progress {job.progress:.0%})"
        )


_BY_STATUS: dict[int, type[MpqApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
}


def api_error(
    status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> MpqApiError:
    """The exception for an error answer with this status (the most specific class)."""
    if status == 429:
        return RateLimited(status, code, message, request_id, retry_after)
    if status == 503:
        return Unavailable(status, code, message, request_id, retry_after)
    if status >= 500:
        return ServerError(status, code, message, request_id)
    return _BY_STATUS.get(status, MpqApiError)(status, code, message, request_id)
