"""``GET /v1/jobs/{id}/events`` on a real ``mpq serve --no-worker`` over real HTTP: the test
writes the job's state into the served database as a worker does, and reads the stream as a
client does (tests/support/sse.py). The stream sends each change once, ends with the whole job
once it is final, is another tenant's 404, lets a reconnecting client skip what it saw, keeps an
idle stream alive and ends it after its lifetime, stops when its client goes away, and holds no
database connection while it waits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.auth import create_key
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.tables import Job, utcnow
from tests.api.apptools import SPEC, data_bytes, model_bytes
from tests.api.served import PEPPER, Served, served
from tests.support.sse import Event, sse_events

EVENT_HEADERS = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # One pooled connection and no overflow: streams must hold none while they wait.
    with served(
        tmp_path_factory.mktemp("events"),
        events_poll_interval_s="0.05",
        db_pool_size="1",
        db_max_overflow="0",
        db_pool_timeout_s="5",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def db(api: Served) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{api.data_dir / 'mpq.db'}")
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def client(api: Served) -> Iterator[httpx.Client]:
    with api.client() as c:
        yield c


def _new_job(client: httpx.Client) -> str:
    model = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
    data = client.post("/v1/datasets", params={"filename": "d.npz"}, content=data_bytes())
    assert model.status_code == data.status_code == 201, (model.text, data.text)
    job = client.post(
        "/v1/jobs",
        json={"model_id": model.json()["id"], "dataset_id": data.json()["id"], "spec": SPEC},
    )
    assert job.status_code == 202, job.text
    return str(job.json()["id"])


def _write(db: sessionmaker[Session], job_id: str, **values: Any) -> None:
    """What a worker writes: the job's row, nothing else."""
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **values))


@contextlib.contextmanager
def _stream(
    client: httpx.Client, job_id: str, **headers: str
) -> Iterator[tuple[httpx.Response, Iterator[Event]]]:
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={**EVENT_HEADERS, **headers}
    ) as response:
        yield response, (e for e in sse_events(response) if e.event)


def test_changes_are_sent_once_each_then_the_final_job_and_the_end(
    client: httpx.Client, db: sessionmaker[Session]
) -> None:
    job_id = _new_job(client)
    with _stream(client, job_id) as (response, events):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        seen = [next(events)]
        _write(db, job_id, status="running", stage="analyze", progress=0.25, attempts=1)
        seen.append(next(events))
        _write(db, job_id, heartbeat_at=utcnow())  # a heartbeat alone is no change
        _write(db, job_id, stage="allocate", progress=0.5)
        seen.append(next(events))
        _write(db, job_id, status="succeeded", progress=1.0, finished_at=utcnow())
        seen.append(next(events))
        rest = list(events)

    progress = [e.data for e in seen[:3]]
    assert [e.event for e in seen] == ["progress", "progress", "progress", "final"]
    assert [(d["status"], d["stage"], d["progress"]) for d in map(_json, progress)] == [
        ("queued", None, 0.0),
        ("running", "analyze", 0.25),
        ("running", "allocate", 0.5),
    ]
    assert len({e.id for e in seen}) == 4 and None not in {e.id for e in seen}
    final = client.get(f"/v1/jobs/{job_id}").json()
    assert _json(seen[3].data) == final
    assert {*_json(progress[2])} == {"status", "stage", "progress", "updated_at"}
    stamps = [_json(progress[2])["updated_at"], final["updated_at"]]
    assert stamps[0] < stamps[1] and stamps[0][19:][-1] == stamps[1][19:][-1]  # one encoding
    assert rest == []  # the stream ended with the final event


def _json(text: str) -> Any:
    import json

    return json.loads(text)


def test_another_tenants_job_is_not_found(
    api: Served, client: httpx.Client, db: sessionmaker[Session]
) -> None:
    job_id = _new_job(client)
    with session_scope(db) as session:
        other = create_key(session, "globex", "test", pepper=PEPPER)
    for headers in ({"Authorization": f"Bearer {other}"}, api.headers):
        ident = job_id if headers != api.headers else "no-such-job"
        response = httpx.get(f"{api.base_url}/v1/jobs/{ident}/events", headers=headers)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{api.base_url}/v1/jobs/{job_id}/events").status_code == 401


def test_a_finished_job_sends_its_final_event_at_once_and_then_204(client: httpx.Client) -> None:
    job_id = _new_job(client)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    with _stream(client, job_id) as (response, events):
        assert response.status_code == 200
        received = list(events)
    assert [e.event for e in received] == ["final"]
    assert _json(received[0].data)["status"] == "cancelled"

    again = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": received[0].id or ""})
    assert again.status_code == 204  # EventSource stops reconnecting


def test_a_reconnecting_client_does_not_get_a_state_again(
    client: httpx.Client, db: sessionmaker[Session]
) -> None:
    job_id = _new_job(client)
    with _stream(client, job_id) as (_, events):
        first = next(events)
    _write(db, job_id, status="running", stage="profile", progress=0.1, attempts=1)
    with _stream(client, job_id, **{"Last-Event-ID": first.id or ""}) as (_, events):
        running = next(events)  # the state at reconnection is new: sent
    with _stream(client, job_id, **{"Last-Event-ID": running.id or ""}) as (_, events):
        _write(db, job_id, status="failed", error_code="boom", finished_at=utcnow())
        after = list(events)
    assert _json(first.data)["status"] == "queued"
    assert (_json(running.data)["stage"], running.event) == ("profile", "progress")
    assert [e.event for e in after] == ["final"]  # "profile" was not sent a second time


def test_streams_hold_no_database_connection(api: Served, client: httpx.Client) -> None:
    job_id = _new_job(client)
    with contextlib.ExitStack() as stack:
        # More open streams than the API has connections (one): all of them still answer...
        for _ in range(4):
            _, events = stack.enter_context(_stream(client, job_id))
            assert next(events).event == "progress"
        # ...and so do plain requests meanwhile.
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200


def test_a_client_that_goes_away_stops_its_stream(api: Served, client: httpx.Client) -> None:
    job_id = _new_job(client)
    with _stream(client, job_id) as (_, events):
        assert next(events).event == "progress"
    api.wait_for_log(f"job {job_id}: event stream closed, the client went away")


def test_an_idle_stream_is_kept_alive_and_ends_after_its_lifetime(tmp_path: Path) -> None:
    with (
        served(
            tmp_path,
            events_poll_interval_s="0.05",
            events_keepalive_s="0.2",
            events_max_lifetime_s="1",
        ) as short,
        short.client() as client,
        _stream(client, _new_job(client)) as (response, _),
    ):
        received = list(sse_events(response, comments=True))
    assert received[0].retry is not None and received[0].retry > 0
    assert [e.event for e in received if e.event] == ["progress"]
    assert "keep-alive" in {e.comment for e in received}


def test_openapi_documents_the_stream(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    ok = op["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    assert "event: final" in ok["description"] and "Last-Event-ID" in ok["description"]
    assert {"204", "404"} <= set(op["responses"])
    assert "webhook_url" in client.get("/openapi.json").json()["components"]["schemas"]["JobPublic"]["properties"]  # fmt: skip
