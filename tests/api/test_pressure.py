"""The API under pressure from slow clients, on a real ``mpq serve`` and a real Postgres with a
pool of 2 connections (and none in overflow): 80 uploads that stall after a few bytes hold no
database connection and no writer thread, so health checks, reads and other uploads go on; when
the stalled clients vanish, nothing is left in storage and nothing is logged as an error.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from tests.api.apptools import data_bytes, model_bytes
from tests.api.served import Served, open_upload, served, stored_objects

STALLED = 80
POOL = {"db_pool_size": "2", "db_max_overflow": "0", "db_pool_timeout_s": "5"}


@pytest.fixture
def pg_served(tmp_path: Path, new_pg_url: Callable[[], str]) -> Iterator[tuple[Served, str]]:
    """``mpq serve`` on a fresh Postgres database with a 2-connection pool; (served, its URL)."""
    url = new_pg_url()
    with served(tmp_path, database_url=url, **POOL) as api:
        yield api, url


def _connection_states(admin: Engine, url: str) -> list[str]:
    """The state of every connection to the database of ``url`` (``pg_stat_activity``)."""
    with admin.connect() as conn:
        rows = conn.execute(
            text("SELECT coalesce(state, '') FROM pg_stat_activity WHERE datname = :db"),
            {"db": make_url(url).database},
        )
        return [r[0] for r in rows]


def _stall(api: Served, n: int) -> list[socket.socket]:
    """``n`` model uploads, each authenticated (the server said 100 Continue) and then stalled
    after 64 bytes of a 1 MB body."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = open_upload(api, "/v1/models?filename=slow.pt", 1_000_000)
            socks.append(sock)
            sock.sendall(model_bytes()[:64])
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def test_stalled_uploads_hold_no_connection_and_block_nothing(
    pg_served: tuple[Served, str], pg_admin: Engine
) -> None:
    api, url = pg_served
    socks = _stall(api, STALLED)  # more than the pool holds: each got past authentication
    try:
        states = _connection_states(pg_admin, url)
        assert "idle in transaction" not in states, states
        assert len(states) <= 2, states  # the pool's size: nothing opened beyond it
        with api.client() as client:
            assert client.get("/healthz").status_code == 200
            r = client.get("/v1/jobs")
            assert r.status_code == 200, r.text
            assert r.json()["items"] == []
            r = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
            assert r.status_code == 201, r.text
            r = client.post("/v1/datasets", params={"filename": "d.npz"}, content=data_bytes())
            assert r.status_code == 201, r.text
            assert client.get("/readyz").status_code == 200
    finally:
        for sock in socks:
            sock.close()  # the stalled clients vanish
    api.wait_for_log("client disconnected during POST /v1/models", STALLED)
    with api.client() as client:
        models = client.get("/v1/models").json()["items"]
    assert [m["filename"] for m in models] == ["m.pt"]
    assert len(stored_objects(api.data_dir)) == 2  # the model and the dataset, no leftovers
    api.stop_and_check_log()


def _waiting_on_locks(admin: Engine, url: str) -> int:
    with admin.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = :db AND wait_event_type = 'Lock'"
                ),
                {"db": make_url(url).database},
            ).scalar_one()
        )


def test_an_exhausted_pool_is_a_503_and_healthz_still_answers(
    pg_served: tuple[Served, str], pg_admin: Engine
) -> None:
    """With both pooled connections stuck behind a lock, the next request waits out the pool
    time-out and gets 503 ``database_unavailable``; ``/healthz`` answers meanwhile; the stuck
    requests complete once the lock goes."""
    api, url = pg_served
    locker = create_engine(url)
    try:
        with locker.connect() as lock, ThreadPoolExecutor(2) as pool, api.client(60) as client:
            lock.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            stuck = [pool.submit(client.get, "/v1/jobs") for _ in range(2)]
            deadline = time.monotonic() + 30
            while _waiting_on_locks(pg_admin, url) < 2:  # both connections taken, waiting
                assert time.monotonic() < deadline, "the two requests never reached the lock"
                time.sleep(0.05)
            r = client.get("/v1/jobs")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
            assert r.headers["Retry-After"] == "5"
            assert client.get("/healthz").json() == {"status": "ok"}
            lock.rollback()  # the lock goes
            assert [f.result().status_code for f in stuck] == [200, 200]
    finally:
        locker.dispose()
    api.stop_and_check_log()


async def _burst(api: Served, n: int) -> list[int]:
    """``n`` concurrent ``GET /v1/jobs``, one connection each; their statuses."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(
        base_url=api.base_url, headers=api.headers, timeout=60, limits=limits
    ) as client:
        responses = await asyncio.gather(*(client.get("/v1/jobs") for _ in range(n)))
    return [r.status_code for r in responses]


def test_a_burst_beyond_threads_and_pool_is_served_without_503(
    pg_served: tuple[Served, str],
) -> None:
    """More concurrent reads than the thread pool has tokens (40) and the database pool has
    connections (2): a finished endpoint must not keep its connection while it waits for a
    token to serialize its answer, or tokens and connections wait on each other until the pool
    time-out (503)."""
    api, _ = pg_served
    for _ in range(3):
        statuses = asyncio.run(_burst(api, 120))
        assert statuses == [200] * 120, sorted(set(statuses))
    api.stop_and_check_log()
