"""Every request gets an id: the caller's ``X-Request-ID`` when it is sane, else a new one.

The id is set in :data:`mpq_service.logs.request_id` for the length of the request (so every log
line of it carries the id), returned as the ``X-Request-ID`` header of every response (errors,
404s and streamed downloads included) and put in every error body
(:func:`api.errors.error_body`). A caller's id is kept only when it is at most 128 characters of
``[A-Za-z0-9._-]``: anything else could forge log lines or grow them without bound, and is
replaced by a fresh one.

A pure ASGI middleware (not ``BaseHTTPMiddleware``, which buffers and breaks streamed responses).
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mpq_service import logs

__all__ = ["HEADER", "RequestId", "accepted_request_id"]

HEADER = "X-Request-ID"
_SANE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def accepted_request_id(incoming: str | None) -> str:
    """``incoming`` when it is a sane id, else a fresh one (32 hex digits)."""
    if incoming is not None and _SANE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


class RequestId:
    """ASGI middleware: set the request id, answer it in ``X-Request-ID``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = accepted_request_id(incoming)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if HEADER not in headers:  # error_response may have set it already
                    headers.append(HEADER, rid)
            await send(message)

        token = logs.request_id.set(rid)
        await self.app(scope, receive, send_with_id)
        # Not reset when the app raises: Starlette's outermost ServerErrorMiddleware answers (and
        # logs) an unhandled error after this returns, in this task's context, and needs the id.
        # The task ends with the request, so the id does not outlive it.
        logs.request_id.reset(token)
