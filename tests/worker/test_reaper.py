"""The reaper and recovery on start, on a real database (SQLite, and Postgres for concurrency):
stale running jobs are re-queued with a new message, or failed at the attempt cap; live ones are
left alone; a broker that refuses leaves the job for the next pass; several reapers at once
re-queue a job exactly once; a job past its time limit is failed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

from mpq_service.db import make_engine, make_sessionmaker
from mpq_service.reaper import Reaper, reap, recover_on_start
from mpq_service.tables import utcnow
from tests.worker.conftest import Env

LONG_AGO = timedelta(hours=1)


class Broker:
    """Records the job ids sent; refuses while ``down``."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False
        self._lock = threading.Lock()

    def __call__(self, job_id: str) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        with self._lock:
            self.sent.append(job_id)


def _running(env: Env, *, attempts: int = 1, beat_age: timedelta = LONG_AGO) -> str:
    now = utcnow()
    return env.create_job(
        status="running", attempts=attempts, started_at=now - beat_age, heartbeat_at=now - beat_age
    )


def test_stale_running_job_is_requeued_with_a_new_message(env: Env) -> None:
    job_id = _running(env)
    broker = Broker()
    done = reap(env.settings, env.session_factory, broker)
    assert done.requeued == [job_id] and not done.failed and not done.timed_out
    assert broker.sent == [job_id]
    job = env.job(job_id)
    assert (job.status, job.attempts, job.heartbeat_at, job.error_code) == ("queued", 1, None, None)
    # Nothing left to do on the next pass.
    assert not reap(env.settings, env.session_factory, broker) and broker.sent == [job_id]


def test_live_and_other_jobs_are_left_alone(env: Env) -> None:
    live = _running(env, beat_age=timedelta(seconds=1))
    queued = env.create_job()
    done = env.create_job(status="succeeded", attempts=1)
    broker = Broker()
    assert not reap(env.settings, env.session_factory, broker)
    assert broker.sent == []
    assert [env.job(j).status for j in (live, queued, done)] == ["running", "queued", "succeeded"]


def test_job_at_the_attempt_cap_fails_with_worker_lost_repeatedly(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_max_attempts=2)
    job_id = _running(env, attempts=2)
    broker = Broker()
    done = reap(env.settings, env.session_factory, broker)
    assert done.failed == [job_id] and broker.sent == []
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", "worker_lost_repeatedly")
    assert job.error_message and "2 time(s)" in job.error_message and job.finished_at


def test_a_refusing_broker_leaves_the_job_for_the_next_pass(env: Env) -> None:
    job_id = _running(env)
    broker = Broker()
    broker.down = True
    assert not reap(env.settings, env.session_factory, broker)
    assert env.job(job_id).status == "running"  # the re-queue was rolled back
    broker.down = False
    assert reap(env.settings, env.session_factory, broker).requeued == [job_id]
    assert broker.sent == [job_id]


def test_job_past_its_time_limit_is_failed(make_env: Callable[..., Env]) -> None:
    env = make_env(job_time_limit_s=60, job_stale_after_s=30, job_heartbeat_interval_s=1)
    now = utcnow()
    # Heartbeat alive, but the attempt started 91 s ago: past limit + stale grace.
    job_id = env.create_job(
        status="running", attempts=1, started_at=now - timedelta(seconds=91), heartbeat_at=now
    )
    in_time = env.create_job(
        status="running", attempts=1, started_at=now - timedelta(seconds=50), heartbeat_at=now
    )
    done = reap(env.settings, env.session_factory, Broker())
    assert done.timed_out == [job_id]
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", "time_limit_exceeded")
    assert job.error_message and "60 s" in job.error_message
    assert env.job(in_time).status == "running"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_reapers_requeue_each_job_exactly_once(
    make_env: Callable[..., Env], new_pg_url: Callable[[], str], backend: str
) -> None:
    url = new_pg_url() if backend == "postgres" else None
    env = make_env(database_url=url) if url else make_env()
    jobs = [_running(env) for _ in range(6)]
    broker = Broker()
    reapers = 6
    barrier = threading.Barrier(reapers)
    errors: list[BaseException] = []

    def run() -> None:
        engine = make_engine(env.settings.database_url)  # one engine each, as separate workers
        try:
            barrier.wait()
            reap(env.settings, make_sessionmaker(engine), broker)
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run) for _ in range(reapers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(broker.sent) == sorted(jobs)  # each once, none twice
    assert {env.job(j).status for j in jobs} == {"queued"}


def test_recover_on_start_requeues_orphans_and_resends_queued_jobs(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_heartbeat_interval_s=1, job_stale_after_s=10)
    orphan = _running(env, beat_age=timedelta(seconds=5))  # older than 3 heartbeat intervals
    alive = _running(env, beat_age=timedelta(seconds=0))
    waiting = env.create_job()
    broker = Broker()
    slept: list[float] = []
    done = recover_on_start(env.settings, env.session_factory, broker, sleep=slept.append)
    assert done.requeued == [orphan]
    assert slept and slept[0] > 3 * env.settings.job_heartbeat_interval_s  # looked again
    # The job whose heartbeat is live stays with its worker; the queued one gets a message.
    assert env.job(alive).status == "running"
    assert sorted(broker.sent) == sorted([orphan, waiting])


def test_reaper_thread_survives_a_database_error(make_env: Callable[..., Env]) -> None:
    env = make_env(reaper_interval_s=3600)
    broker = Broker()
    bad = make_sessionmaker(make_engine("postgresql://nobody@127.0.0.1:9/none"))
    reaper = Reaper(env.settings, bad, broker)
    assert not reaper.run_once()  # logged, nothing raised
    job_id = _running(env)
    good = Reaper(env.settings, env.session_factory, broker)
    assert good.run_once().requeued == [job_id]
