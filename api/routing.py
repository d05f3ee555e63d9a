"""Routes whose sync endpoints give their database connection back the moment they return.

FastAPI runs a sync endpoint in the thread pool, validates what it returned in the thread pool
again (a second token), and closes the request's session (``SessionDep``) only after the
response is sent; all that time the session keeps its pooled connection. Under load every
thread-pool token can end up held by endpoints waiting for a connection, while every connection
is held by a finished endpoint waiting for a token to serialize its answer: nothing moves until
the pool time-out, and clients get 503s after long stalls (``bench/bench_load.py`` found it at
200 clients). Closing an endpoint's sessions in its own thread as it returns breaks the cycle:
a connection is only ever held by a thread that is running.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

__all__ = ["SessionReleasingRoute", "releases_sessions"]


def releases_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` closing the sessions it was given as it returns (or raises).

    Endpoints return schemas or responses built inside them, never ORM rows to be read later,
    so nothing needs the session afterwards; the dependency's own close is then a no-op.
    """

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return run


class SessionReleasingRoute(APIRoute):
    """An :class:`APIRoute` whose sync endpoint releases its sessions as it returns (async
    endpoints hand their database work to threads that commit, and are left as they are)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = releases_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)
