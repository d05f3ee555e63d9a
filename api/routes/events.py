"""``GET /v1/jobs/{id}/events``: a job followed live, as server-sent events.

The database is the one place where a job's state is (workers write status, stage and progress
there; the embedded mode has no other channel), so the stream reads the job row every
``events_poll_interval_s``, each time in a short session of its own run in the thread pool: a
stream that lives an hour never holds a pooled connection between two reads. An event is sent
only when the job changed (status, stage or progress; heartbeats do not count).

Events, each with an ``id:`` naming the job's state:

- ``progress``: ``{"status", "stage", "progress", "updated_at"}``, first the state at connection,
  then every change;
- ``final``: the whole job (as ``GET /v1/jobs/{id}``) once it succeeded, failed or was
  cancelled; the stream then ends;
- ``error``: ``{"error": {"code": "not_found", ...}}`` when the job is deleted meanwhile; the
  stream ends.

A reconnecting client (``Last-Event-ID``, as ``EventSource`` sends it) gets no event again for
a state it has seen; one that saw the ``final`` event gets ``204 No Content``, which tells
``EventSource`` to stop reconnecting. An idle stream carries a ``: keep-alive`` comment every
``events_keepalive_s``; a stream is closed after ``events_max_lifetime_s`` (the client
reconnects). A client that goes away stops its stream at the next read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, SettingsDep
from api.errors import NotFound, error_body
from api.ownership import get_owned
from mpq_service.job_public import JobPublic
from mpq_service.job_status import JobStatus
from mpq_service.reaper import first_line
from mpq_service.settings import Settings
from mpq_service.tables import Job, Tenant

__all__ = ["RECONNECT_MS", "event_id", "router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])
# Under "mpq", whose INFO messages `mpq serve` shows.
log = logging.getLogger("mpq.api.events")

#: The ``retry:`` the stream opens with: how long ``EventSource`` waits before reconnecting.
RECONNECT_MS = 2000

_PROGRESS_FIELDS = {"status", "stage", "progress", "updated_at"}
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_EVENTS_DOC = (
    "A `text/event-stream`. `event: progress`, `data: {status, stage, progress, updated_at}` at "
    "connection and at every change; `event: final`, `data: <the job>` once it has ended, and "
    "the stream closes; `event: error` if the job is deleted meanwhile. Every event has an "
    "`id`; reconnect with `Last-Event-ID` to skip what you saw (204 once you saw `final`). "
    "`: keep-alive` comments keep an idle stream open."
)
# One event of the stream (OpenAPI 3.1 reads a text/event-stream schema as each event's).
_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["progress", "final", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "progress: {status, stage, progress, updated_at}; final: the job "
            "(JobPublic); error: the error envelope",
        },
        "id": {"type": "string", "description": "the job's state; send it as Last-Event-ID"},
        "retry": {"type": "integer", "description": "milliseconds before a reconnection"},
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": _EVENTS_DOC, "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}}},
    204: {"description": "the client's Last-Event-ID is the job's final event: nothing more"},
    404: {"description": "no such job of the caller's tenant"},
}  # fmt: skip


def event_id(job: JobPublic) -> str:
    """The id of the event for the job's current state: its attempt, status, stage, progress."""
    return f"{job.attempts}-{JobStatus(job.status).value}-{job.stage or ''}-{job.progress:.4f}"


def _event(name: str, ident: str | None, data: str) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n"


def _progress_data(job: JobPublic) -> str:
    # Encoded as the job itself is (the same timestamps as GET /v1/jobs/{id}).
    return json.dumps(job.model_dump(mode="json", include=_PROGRESS_FIELDS))


def _read(factory: sessionmaker[Session], job_id: str, tenant: Tenant) -> JobPublic:
    """The job now, read in a session that is closed (its connection returned) at once."""
    with factory() as session:
        return JobPublic.of(get_owned(session, Job, job_id, tenant))


async def _stream(
    request: Request, tenant: Tenant, job: JobPublic, seen: str | None, settings: Settings
) -> AsyncIterator[str]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    started = last_write = time.monotonic()
    # Starlette cancels this generator when the client disconnects (the finally still logs);
    # the is_disconnected() check covers servers that only report it when asked.
    ended = "the client went away"
    try:
        yield f"retry: {RECONNECT_MS}\n\n"
        while True:
            ident = event_id(job)
            if JobStatus(job.status).is_final:
                ended = "the job has ended"
                yield _event("final", ident, job.model_dump_json())
                return
            now = time.monotonic()
            if ident != seen:
                yield _event("progress", ident, _progress_data(job))
                seen, last_write = ident, now
            elif now - last_write >= settings.events_keepalive_s:
                yield ": keep-alive\n\n"
                last_write = now
            if now - started >= settings.events_max_lifetime_s:
                ended = "its lifetime is over"  # the client reconnects with its Last-Event-ID
                return
            await anyio.sleep(settings.events_poll_interval_s)
            if await request.is_disconnected():
                return
            try:
                job = await run_in_threadpool(_read, factory, job.id, tenant)
            except NotFound as exc:
                ended = "the job was deleted"
                yield _event("error", None, json.dumps(error_body("not_found", exc.message)))
                return
            except SQLAlchemyError as exc:  # an outage: keep the stream, read again next time
                log.warning("job %s events: database not reachable: %s", job.id, first_line(exc))
    finally:
        log.info("job %s: event stream closed, %s", job.id, ended)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=_RESPONSES,
    summary="Follow a job as server-sent events",
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """The job's progress as it happens, then its final state, as server-sent events (see
    ``api.routes.events``): ``new EventSource(url)`` in a browser (with the API key sent by a
    proxy or a polyfill that sets headers), ``curl -N -H 'Authorization: Bearer ...'``."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    job = await run_in_threadpool(_read, factory, job_id, tenant)  # 404 before any stream
    if JobStatus(job.status).is_final and last_event_id == event_id(job):
        return Response(status_code=204)
    return StreamingResponse(
        _stream(request, tenant, job, last_event_id, settings),
        media_type="text/event-stream",
        headers=_STREAM_HEADERS,
    )
