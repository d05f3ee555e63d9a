"""The FastAPI application, built by :func:`create_app` (nothing is created at import time).

``uvicorn --factory api.app:create_app`` serves it with settings from the environment. This
module, and everything it imports, never imports torch: the API only stores uploads, sniffs
their containers and queues jobs; the workers do the heavy lifting.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from api.errors import install_error_handlers
from api.metrics import install_metrics
from api.openapi import install_openapi, operation_id
from api.pages import pages_router
from api.queue import Enqueue, celery_enqueue
from api.readiness import (
    Probe,
    broker_probe,
    database_probe,
    readiness_response,
    storage_probe,
)
from api.request_guard import RejectNulCharacters
from api.request_id import RequestId
from api.routes import api_router
from mpq_service.db import make_engine, make_sessionmaker, normalize_url
from mpq_service.settings import Settings, get_settings
from mpq_service.storage import make_storage

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_DESCRIPTION = (
    "Mixed-precision quantization as a service. Upload a model and calibration data, submit a "
    "job with a budget, poll it, download the quantized model. Authenticate with "
    '`Authorization: Bearer <API key>`; errors are `{"error": {"code", "message"}}`.'
)


DB_CONNECT_TIMEOUT_S = 5  # a database host that does not answer is an outage, not a hang


def _make_api_engine(settings: Settings) -> Engine:
    """The API's engine: a bounded pool (``MPQ_DB_POOL_*``) whose wait for a free connection is
    bounded too, and a bounded connect on Postgres, so an outage is a quick 503, never a hang."""
    url = normalize_url(settings.database_url)
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": DB_CONNECT_TIMEOUT_S}
    if url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:"):
        kwargs.update(
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_s,
        )
    return make_engine(url, **kwargs)


def _add_root_and_health_routes(app: FastAPI) -> None:
    """``/`` (to the web pages), ``/healthz`` and ``/readyz``."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        """People who open the service's address in a browser land on its web pages."""
        return RedirectResponse("/ui/", status_code=307)

    @app.get(
        "/healthz",
        tags=["health"],
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    async def healthz() -> dict[str, str]:
        """The process is up. Checks nothing and waits on nothing (no database, no thread):
        it answers while every connection or worker thread is busy."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=None,
        responses={
            200: {"content": {"application/json": {"example": {"status": "ok"}}}},
            503: {
                "description": "not ready: the error names every dependency that fails",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"},
                        "example": {
                            "error": {"code": "not_ready", "message": "broker: refused"},
                            "checks": {"database": "ok", "broker": "broker: refused"},
                        },
                    }
                },
            },
        },
    )
    def readyz() -> dict[str, Any] | JSONResponse:
        """The database answers, the storage is ready, the broker takes connections and (under
        ``mpq serve``) the worker runs; 503 naming every one that does not."""
        return readiness_response(app.state.readiness_probes)


def create_app(settings: Settings | None = None, *, enqueue: Enqueue | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: from the environment).

    Args:
        settings: the service's settings; the database must already be migrated
            (``python -m mpq_service.migrate``).
        enqueue: hands a new job's id to the workers; default sends the Celery task
            ``mpq.run_job`` through ``settings.broker_url``.

    Example:
        >>> app = create_app(Settings(data_dir=tmp_path), enqueue=queued.append)
    """
    settings = settings or get_settings()
    engine = _make_api_engine(settings)
    storage = make_storage(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(storage.ensure_ready)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="mpq",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = storage
    app.state.enqueue = enqueue if enqueue is not None else celery_enqueue(settings)
    probes: dict[str, Probe] = {
        "database": database_probe(engine),
        "storage": storage_probe(storage),
    }
    if enqueue is None:  # jobs go through the Celery broker: it must be reachable
        probes["broker"] = broker_probe(settings)
    app.state.readiness_probes = probes
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RejectNulCharacters)
    install_metrics(app, settings)  # counts what the middleware above refuses too
    app.add_middleware(RequestId)  # outermost: every answer and log line carries the id
    app.include_router(api_router)
    app.include_router(pages_router)

    _add_root_and_health_routes(app)
    return app
