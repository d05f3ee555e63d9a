"""``/readyz``: every dependency the service needs to take and run jobs, each probed by name.

A probe returns None when its dependency is fine, or one sentence saying what is wrong. The app
(:func:`api.app.create_app`) registers ``database``, ``storage`` and, when it sends jobs through
Celery, ``broker``; ``mpq serve`` adds ``worker`` (its supervisor's view of the embedded
worker). :func:`readiness_response` runs them all, so one answer says everything that is wrong:
200 ``{"status": "ok"}``, or 503 ``{"error": {"code": "not_ready", "message": ...}, "checks":
{name: "ok" | what is wrong}}``. Probes never wait long: the broker gets 2 s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text

from api.errors import error_body

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

    from mpq_service.settings import Settings
    from mpq_service.storage import Storage

__all__ = [
    "Probe",
    "broker_probe",
    "database_probe",
    "readiness_response",
    "storage_probe",
]

log = logging.getLogger(__name__)

Probe = Callable[[], "str | None"]
"""None when the dependency is fine, else what is wrong (one sentence)."""

_BROKER_TIMEOUT_S = 2.0


def database_probe(engine: Engine) -> Probe:
    def probe() -> str | None:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("readyz: database not reachable: %s", exc)
            return "the database is not reachable"
        return None

    return probe


def storage_probe(storage: Storage) -> Probe:
    def probe() -> str | None:
        try:
            storage.ensure_ready()
        except Exception as exc:
            log.warning("readyz: storage not ready: %s", exc)
            return "the object storage is not ready"
        return None

    return probe


def _folder_probe(folder: Path) -> Probe:
    def probe() -> str | None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"the broker folder {folder} cannot be created ({exc.strerror})"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"the broker folder {folder} is not writable"
        return None

    return probe


def broker_probe(settings: Settings) -> Probe:
    """The broker takes connections: the filesystem broker's queue folder is writable, or a
    server broker (Redis) accepts a connection within 2 s."""
    url = settings.broker_url
    if url.startswith("filesystem:"):
        return _folder_probe(Path(settings.broker_dir) / "queue")

    def probe() -> str | None:
        from kombu import Connection
        from kombu.utils.url import maybe_sanitize_url

        try:
            with Connection(url, connect_timeout=_BROKER_TIMEOUT_S) as conn:
                conn.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0, timeout=_BROKER_TIMEOUT_S
                )
        except Exception as exc:
            log.warning("readyz: broker not reachable: %s", exc)
            return f"the broker at {maybe_sanitize_url(url)} is not reachable"
        return None

    return probe


def readiness_response(probes: Mapping[str, Probe]) -> dict[str, Any] | JSONResponse:
    """Run every probe; ``{"status": "ok"}`` or the 503 response naming what is wrong."""
    from fastapi.responses import JSONResponse

    checks = {name: probe() for name, probe in probes.items()}
    problems = [problem for problem in checks.values() if problem]
    if not problems:
        return {"status": "ok"}
    body: dict[str, Any] = dict(error_body("not_ready", "; ".join(problems)))
    body["checks"] = {name: problem or "ok" for name, problem in checks.items()}
    return JSONResponse(body, status_code=503)
