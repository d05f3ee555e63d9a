"""Attempts never overwrite each other and survive database blips (real SQLite, real Postgres
behind a TCP proxy the test cuts):

- the heartbeat stamps the running attempt and notices when a newer attempt owns the job;
- a duplicate message for a job whose attempt is alive is ignored;
- an attempt presumed dead, whose successor ran to completion, records nothing and deletes
  nothing, whether it wakes up mid-pipeline or at its final write;
- the final write waits out a Postgres outage; an outage longer than the retries leaves the job
  ``running`` (not failed) for the reaper.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

import worker.jobs
from mpq_service.db import session_scope
from mpq_service.reaper import reap
from mpq_service.tables import Artifact, Job, utcnow
from tests.support.tcp_proxy import TcpProxy
from tests.worker.conftest import Env
from worker.heartbeat import Heartbeat
from worker.jobs import run_job

WAIT_S = 30.0
#: Long enough that no beat of the attempt under test lands while the test plays the reaper.
QUIET = {"job_heartbeat_interval_s": 30.0, "job_stale_after_s": 90.0}


def _wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {WAIT_S:.0f} s"
        time.sleep(0.02)


def _artifact_rows(env: Env, job_id: str) -> list[tuple[str, str, str]]:
    with env.session_factory() as s:
        rows = s.execute(
            select(Artifact.id, Artifact.name, Artifact.sha256).where(Artifact.job_id == job_id)
        ).all()
    return sorted((r.id, r.name, r.sha256) for r in rows)


def _snapshot(env: Env, job_id: str) -> tuple[Any, ...]:
    job = env.job(job_id)
    return (job.status, job.attempts, job.result, job.finished_at, _artifact_rows(env, job_id))


def _presume_dead_and_rerun(env: Env, job_id: str, sent: list[str]) -> tuple[Any, ...]:
    """What the rest of the service does to an attempt that stopped beating: the reaper
    re-queues it, another worker runs attempt 2 to the end. The job's state afterwards."""
    with session_scope(env.session_factory) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    assert reap(env.settings, env.session_factory, sent.append).requeued == [job_id]
    after = env.run_job(job_id)
    assert (after.status, after.attempts) == ("succeeded", 2), after.error_message
    return _snapshot(env, job_id)


def test_heartbeat_stamps_the_attempt_and_notices_a_newer_one(env: Env) -> None:
    job_id = env.create_job(status="running", attempts=1)
    with Heartbeat(env.session_factory, job_id, 1, interval_s=0.05) as heartbeat:
        _wait_for("a first beat", lambda: env.job(job_id).heartbeat_at is not None)
        first = env.job(job_id).heartbeat_at
        assert first is not None
        _wait_for("a later beat", lambda: (env.job(job_id).heartbeat_at or first) > first)
        assert not heartbeat.lost.is_set()
        with session_scope(env.session_factory) as s:  # a newer attempt claims the job
            s.execute(update(Job).where(Job.id == job_id).values(attempts=2))
        assert heartbeat.lost.wait(WAIT_S)
    assert heartbeat.beats >= 2 and heartbeat.failures == 0


def test_duplicate_message_for_a_live_attempt_is_ignored(env: Env) -> None:
    now = utcnow()
    job_id = env.create_job(status="running", attempts=1, started_at=now, heartbeat_at=now)
    job = env.run_job(job_id)
    assert (job.status, job.attempts, job.started_at) == ("running", 1, now)


def test_success_clears_the_heartbeat(env: Env) -> None:
    job = env.run_job(env.create_job())
    assert (job.status, job.attempts, job.heartbeat_at) == ("succeeded", 1, None)


def test_attempt_presumed_dead_mid_pipeline_records_and_deletes_nothing(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(**QUIET)
    job_id = env.create_job()
    original = worker.jobs.run_child_job
    sent: list[str] = []
    calls: list[str] = []
    successor: list[tuple[Any, ...]] = []

    def stall_while_replaced(*args: Any, **kwargs: Any) -> Any:
        # Attempt 1 stalls as its pipeline starts; attempt 2 runs the whole job meanwhile.
        if not calls:
            calls.append("attempt 1")
            successor.append(_presume_dead_and_rerun(env, job_id, sent))
        return original(*args, **kwargs)

    monkeypatch.setattr(worker.jobs, "run_child_job", stall_while_replaced)
    env.run_job(job_id)  # attempt 1 resumes after attempt 2 finished, and must stop
    assert sent == [job_id]
    assert _snapshot(env, job_id) == successor[0]
    rows = env.job(job_id).artifacts
    assert rows and all(env.storage.exists(a.storage_key) for a in rows)


def test_attempt_presumed_dead_at_its_final_write_records_nothing(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(**QUIET)
    job_id = env.create_job()
    original = worker.jobs._record_success
    sent: list[str] = []
    calls: list[str] = []
    successor: list[tuple[Any, ...]] = []

    def replaced_before_the_write(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append("attempt 1")
            successor.append(_presume_dead_and_rerun(env, job_id, sent))
        return original(*args, **kwargs)

    monkeypatch.setattr(worker.jobs, "_record_success", replaced_before_the_write)
    env.run_job(job_id)
    assert _snapshot(env, job_id) == successor[0]  # result, artifacts, finish time: attempt 2's
    with env.session_factory() as s:
        count = s.scalar(select(func.count()).select_from(Artifact))
    assert count == len(successor[0][-1])
    # Attempt 1 uploaded to the same keys before it found out: they stay (attempt 2's rows
    # point at them).
    rows = env.job(job_id).artifacts
    assert rows and all(env.storage.exists(a.storage_key) for a in rows)


@pytest.fixture
def pg_proxy(new_pg_url: Callable[[], str]) -> Iterator[tuple[TcpProxy, str]]:
    """A fresh Postgres database and its URL through a TCP proxy the test can cut."""
    url = make_url(new_pg_url())
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)


def _outage_at_final_write(
    monkeypatch: pytest.MonkeyPatch, proxy: TcpProxy, outage_s: float
) -> None:
    original = worker.jobs._record_success
    outages: list[float] = []

    def cut_then_write(*args: Any, **kwargs: Any) -> Any:
        if not outages:  # the first attempt's final write only
            outages.append(outage_s)
            proxy.cut()
            threading.Timer(outage_s, proxy.restore).start()
        return original(*args, **kwargs)

    monkeypatch.setattr(worker.jobs, "_record_success", cut_then_write)


def test_final_write_waits_out_a_postgres_outage(
    make_env: Callable[..., Env],
    pg_proxy: tuple[TcpProxy, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, url = pg_proxy
    env = make_env(database_url=url, job_final_write_retry_s=60)
    job_id = env.create_job()
    _outage_at_final_write(monkeypatch, proxy, outage_s=3.0)
    with caplog.at_level(logging.WARNING, logger="worker.jobs"):
        job = env.run_job(job_id)
    assert "final write: database error, retrying" in caplog.text
    assert (job.status, job.attempts, job.progress) == ("succeeded", 1, 1.0)
    assert job.artifacts and all(env.storage.exists(a.storage_key) for a in job.artifacts)


def test_outage_past_the_retries_leaves_the_job_to_the_reaper(
    make_env: Callable[..., Env],
    pg_proxy: tuple[TcpProxy, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy, url = pg_proxy
    env = make_env(database_url=url, job_final_write_retry_s=0.5)
    job_id = env.create_job()
    _outage_at_final_write(monkeypatch, proxy, outage_s=4.0)
    run_job(
        job_id,
        settings=env.settings,
        session_factory=env.session_factory,
        storage=env.storage,
        workdir=env.workdir,
    )
    assert not proxy.up  # run_job gave up while the database was still away
    _wait_for("the database to come back", lambda: proxy.up)
    job = env.job(job_id)
    assert (job.status, job.error_code, job.result) == ("running", None, None)  # not failed
    sent: list[str] = []
    assert reap(env.settings, env.session_factory, sent.append, stale_after_s=0.0).requeued == [
        job_id
    ]
    assert sent == [job_id]
    again = env.run_job(job_id)
    assert (again.status, again.attempts) == ("succeeded", 2)
