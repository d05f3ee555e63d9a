"""Refuse, before any route runs, request paths and query strings that hold a NUL character.

A NUL reaches the routes as an ordinary character of an id, a filter or a file name; SQLite
stores it, but Postgres refuses any text holding one and the query fails with a server error.
No id, name or filter of this API can hold one, so such a request is the caller's mistake:
``400 invalid_characters``.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response

__all__ = ["RejectNulCharacters"]


def _has_nul(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    query: bytes = scope.get("query_string", b"")
    return "\x00" in path or b"\x00" in unquote_to_bytes(query)


class RejectNulCharacters:
    """ASGI middleware answering ``400 invalid_characters`` to a NUL in the path or query."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _has_nul(scope):
            response = error_response(
                400,
                "invalid_characters",
                "the request path or query holds a NUL character; no id, name or filter does",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
