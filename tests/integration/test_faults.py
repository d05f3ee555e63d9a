"""Faults with real processes: jobs are never lost, never stuck, never completed twice.

- A Celery worker's whole process group is SIGKILLed mid-job (Postgres, Redis, prefork worker):
  a second worker's reaper re-queues the job once its heartbeat is stale; it finishes there.
- Postgres becomes unreachable for 30 s mid-job (a TCP proxy between the worker and the shared
  Postgres server is cut, then restored): the job rides it out and finishes once.
- ``mpq serve`` (embedded: SQLite, filesystem broker, solo worker) gets SIGTERM or SIGKILL
  mid-job and is started again; its worker is SIGKILLed alone and the supervisor restarts it
  (``/readyz`` says 503 meanwhile).

After each fault every job must end ``succeeded`` (result and artifacts written once, every
artifact's stored bytes matching its row, exactly one "succeeded" line in all worker logs) or
``failed`` with an error code; none stays ``running``. Heartbeats, the stale limit and the reaper
run on short settings (:data:`LIVENESS`) so each test takes well under a minute of waiting.
The slow job is the zoo MLP fine-tuned for many epochs with early stopping off.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from api.auth import create_key
from mpq_service.celery_config import TASK_RUN_JOB, make_celery
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from mpq_service.settings import Settings
from mpq_service.storage import Storage, make_storage
from mpq_service.tables import Job, Tenant
from tests.support.processes import (
    ServiceProcess,
    pid_alive,
    start_celery_worker,
    start_http_service,
    wait_pid_gone,
)
from tests.support.tcp_proxy import TcpProxy
from tests.worker.conftest import Env, mlp_npz

REPO = Path(__file__).resolve().parents[2]
MPQ = Path(sys.executable).parent / "mpq"
WAIT_S = 180.0
OUTAGE_S = 30.0

#: Fine-tuning long enough (seconds) to be interrupted; early stopping off.
SLOW_SPEC: dict[str, Any] = {
    "budgets": ["avg-bits=4"],
    "batch_size": 16,
    "finetune": {"epochs": 1000, "batch_size": 8, "lr": 1e-3, "patience": 10000},
}
QUICK_SPEC: dict[str, Any] = {
    "budgets": ["avg-bits=4"],
    "batch_size": 16,
    "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
}
LIVENESS = {
    "MPQ_JOB_HEARTBEAT_INTERVAL_S": "0.5",
    "MPQ_JOB_STALE_AFTER_S": "4",
    "MPQ_REAPER_INTERVAL_S": "1",
}

pytestmark = pytest.mark.slow


# --- processes and state -------------------------------------------------------------------


def _service_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env.update(
        {
            "MPQ_DATA_DIR": str(data_dir),
            "MPQ_STORAGE": "local",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            **LIVENESS,
            **settings,
        }
    )
    return env


def _start_worker(env: dict[str, str], tmp: Path, name: str) -> ServiceProcess:
    return start_celery_worker(name, env, tmp, tmp / f"{name}.log")


def _job(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None, f"job {job_id} is gone"
        _ = job.artifacts
        return job


def _wait(
    what: str,
    condition: Callable[[], bool],
    procs: Iterable[ServiceProcess] = (),
    timeout_s: float = WAIT_S,
) -> None:
    """Poll ``condition`` until true; fail with the processes' logs if it never is."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(p.describe() for p in procs)
            raise AssertionError(f"no {what} after {timeout_s:.0f} s\n{logs}")
        time.sleep(0.1)


def _wait_stage(
    factory: sessionmaker[Session], job_id: str, stage: str, procs: Iterable[ServiceProcess]
) -> None:
    def there() -> bool:
        job = _job(factory, job_id)
        assert job.status in ("queued", "running"), f"job {job.status} before {stage}"
        return job.stage == stage

    _wait(f"stage {stage} of job {job_id}", there, procs)


def _final(factory: sessionmaker[Session], job_ids: Iterable[str]) -> Callable[[], bool]:
    ids = list(job_ids)
    return lambda: all(_job(factory, j).status in ("succeeded", "failed") for j in ids)


def assert_settled_once(
    factory: sessionmaker[Session], storage: Storage, job_ids: Iterable[str], logs: Iterable[Path]
) -> dict[str, Job]:
    """Every job final, with a code when failed; a success recorded once and consistent."""
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    jobs = {}
    for job_id in job_ids:
        job = jobs[job_id] = _job(factory, job_id)
        assert job.status in ("succeeded", "failed"), f"job {job_id} left {job.status}"
        assert job.heartbeat_at is None
        if job.status == "failed":
            assert job.error_code and job.error_message, f"job {job_id} failed without a code"
            continue
        assert text.count(f"job {job_id}: succeeded") == 1, "success recorded more than once"
        assert job.result is not None and job.progress == 1.0
        names = [a.name for a in job.artifacts]
        assert names and len(names) == len(set(names)) and "model.pt" in names
        for artifact in job.artifacts:
            body = storage.read_bytes(artifact.storage_key)
            assert hashlib.sha256(body).hexdigest() == artifact.sha256, artifact.name
    return jobs


# --- Postgres + Redis + prefork workers ----------------------------------------------------


def _pg_env(url: str, data_dir: Path, model_bytes: bytes) -> Env:
    settings = Settings(data_dir=data_dir, database_url=url, storage="local")
    upgrade(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    storage = make_storage(settings)
    storage.ensure_ready()
    with session_scope(factory) as s:
        tenant = Tenant(name="faults")
        s.add(tenant)
        s.flush()
        tenant_id = tenant.id
    return Env(settings, engine, factory, storage, data_dir / "work", tenant_id, model_bytes)


def _submit(env: Env, broker_url: str, spec: dict[str, Any]) -> str:
    job_id = env.create_job(spec=spec)
    app = make_celery(Settings(data_dir=env.settings.data_dir, broker_url=broker_url))
    app.send_task(TASK_RUN_JOB, args=[job_id])
    return job_id


def test_worker_group_sigkill_mid_job_requeues_and_finishes_once(
    new_pg_url: Callable[[], str],
    redis_url: str,
    tmp_path: Path,
    zoo_bytes: Callable[[str, str], bytes],
) -> None:
    url = new_pg_url()
    env = _pg_env(url, tmp_path / "data", zoo_bytes("mlp", "script"))
    service_env = _service_env(tmp_path / "data", MPQ_DATABASE_URL=url, MPQ_BROKER_URL=redis_url)
    first = _start_worker(service_env, tmp_path, "worker-a")
    second: ServiceProcess | None = None
    try:
        slow = _submit(env, redis_url, SLOW_SPEC)
        quick = _submit(env, redis_url, QUICK_SPEC)  # waits in Redis behind the slow one
        _wait_stage(env.session_factory, slow, "finetune", [first])
        os.killpg(first.pid, signal.SIGKILL)  # the parent and its pool child at once
        assert wait_pid_gone(first.pid, 10)
        assert _job(env.session_factory, slow).status == "running"  # nobody settled it yet

        second = _start_worker(service_env, tmp_path, "worker-b")
        _wait("both jobs final", _final(env.session_factory, [slow, quick]), [second])
        jobs = assert_settled_once(
            env.session_factory, env.storage, [slow, quick], [first.log_path, second.log_path]
        )
        assert (jobs[slow].status, jobs[slow].attempts) == ("succeeded", 2)
        assert (jobs[quick].status, jobs[quick].attempts) == ("succeeded", 1)
        assert "lost its worker (no heartbeat); re-queued" in second.log_path.read_text()
    finally:
        for proc in (second, first):
            if proc is not None:
                proc.stop()
        env.engine.dispose()


def test_postgres_unreachable_for_30_s_mid_job_finishes_once(
    new_pg_url: Callable[[], str],
    redis_url: str,
    tmp_path: Path,
    zoo_bytes: Callable[[str, str], bytes],
) -> None:
    url = make_url(new_pg_url())
    env = _pg_env(url.render_as_string(hide_password=False), tmp_path / "data", b"")
    env.model_bytes = zoo_bytes("mlp", "script")
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        # Stale limit above the outage: the job's own attempt is expected to ride it out.
        service_env = _service_env(
            tmp_path / "data",
            MPQ_DATABASE_URL=proxied,
            MPQ_BROKER_URL=redis_url,
            MPQ_JOB_STALE_AFTER_S="60",
        )
        worker = _start_worker(service_env, tmp_path, "worker")
        try:
            job_id = _submit(env, redis_url, SLOW_SPEC)
            _wait_stage(env.session_factory, job_id, "finetune", [worker])
            proxy.cut()
            time.sleep(OUTAGE_S)  # the fault's length, not an assertion on timing
            assert _job(env.session_factory, job_id).status == "running"
            proxy.restore()
            _wait("the job final", _final(env.session_factory, [job_id]), [worker])
            jobs = assert_settled_once(
                env.session_factory, env.storage, [job_id], [worker.log_path]
            )
            assert (jobs[job_id].status, jobs[job_id].attempts) == ("succeeded", 1)
            # The worker saw the outage (its heartbeats failed) and carried on; whether the final
            # write also had to retry depends on when the pipeline ended.
            assert "heartbeat failed" in worker.log_path.read_text()
            assert worker.alive()
        finally:
            worker.stop()
            env.engine.dispose()


# --- embedded: mpq serve --------------------------------------------------------------------


class Embedded:
    """``mpq serve`` on ``data_dir``: started, stopped and started again by the test."""

    def __init__(self, tmp: Path, **settings: str) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.env = _service_env(self.data_dir, MPQ_WORKER_STOP_TIMEOUT_S="1", **settings)
        self.log_path = tmp / "serve.log"
        self.settings = Settings(data_dir=self.data_dir)
        upgrade(self.settings.database_url)
        self.engine = make_engine(self.settings.database_url)
        self.factory = make_sessionmaker(self.engine)
        self.storage = make_storage(self.settings)
        with session_scope(self.factory) as s:
            self.key = create_key(s, "acme", "faults")
        self.proc: ServiceProcess | None = None
        self.base = ""

    def start(self) -> None:
        self.proc, self.base = start_http_service(
            "mpq serve",
            lambda port: [str(MPQ), "serve", "--port", str(port)],
            env=self.env,
            cwd=self.tmp,
            log_path=self.log_path,
            timeout_s=90.0,
        )

    def worker_pid(self) -> int:
        assert self.proc is not None
        pids = [int(p) for p in _worker_pids(self.proc.tail(100_000))]
        assert pids, self.proc.tail()
        return pids[-1]

    def client(self) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.base, headers=auth, timeout=30)

    def submit(self, spec: dict[str, Any], model_bytes: bytes) -> str:
        with self.client() as c:
            model = c.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes)
            data = c.post("/v1/datasets", params={"filename": "d.npz"}, content=mlp_npz())
            assert model.status_code == 201 and data.status_code == 201, model.text + data.text
            body = {"model_id": model.json()["id"], "dataset_id": data.json()["id"], "spec": spec}
            job = c.post("/v1/jobs", json=body)
            assert job.status_code == 202, job.text
            return str(job.json()["id"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        for pid in _worker_pids(self.log_path.read_text(errors="replace")):
            if pid_alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
        self.engine.dispose()


def _worker_pids(log: str) -> list[str]:
    import re

    return re.findall(r"worker started \(pid (\d+)", log)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterable[Embedded]:
    service = Embedded(tmp_path)
    try:
        yield service
    finally:
        service.close()


@pytest.mark.parametrize(
    ("sig", "attempts"),
    # SIGTERM: serve stops its worker (killed after MPQ_WORKER_STOP_TIMEOUT_S) and the next
    # start re-queues the job. SIGKILL: the kernel sends the worker SIGTERM (parent death
    # signal); it finishes its job, then exits.
    [(signal.SIGTERM, 2), (signal.SIGKILL, 1)],
    ids=["sigterm", "sigkill"],
)
def test_mpq_serve_stopped_mid_job_finishes_once_after_restart(
    embedded: Embedded, zoo_bytes: Callable[[str, str], bytes], sig: signal.Signals, attempts: int
) -> None:
    embedded.start()
    assert embedded.proc is not None
    slow = embedded.submit(SLOW_SPEC, zoo_bytes("mlp", "script"))
    quick = embedded.submit(QUICK_SPEC, zoo_bytes("mlp", "script"))
    _wait_stage(embedded.factory, slow, "finetune", [embedded.proc])
    worker = embedded.worker_pid()
    embedded.proc.popen.send_signal(sig)
    embedded.proc.popen.wait(timeout=60)
    assert wait_pid_gone(worker, WAIT_S), f"worker {worker} still running"
    assert _job(embedded.factory, slow).status == ("running" if attempts == 2 else "succeeded")

    embedded.start()
    _wait("both jobs final", _final(embedded.factory, [slow, quick]), [embedded.proc])
    jobs = assert_settled_once(
        embedded.factory, embedded.storage, [slow, quick], [embedded.log_path]
    )
    assert jobs[slow].status == jobs[quick].status == "succeeded"
    assert (jobs[slow].attempts, jobs[quick].attempts) == (attempts, 1)


def test_embedded_worker_killed_is_restarted_and_its_job_requeued(
    embedded: Embedded, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    embedded.start()
    assert embedded.proc is not None
    slow = embedded.submit(SLOW_SPEC, zoo_bytes("mlp", "script"))
    _wait_stage(embedded.factory, slow, "finetune", [embedded.proc])
    worker = embedded.worker_pid()
    os.kill(worker, signal.SIGKILL)
    assert wait_pid_gone(worker, 10)

    seen: list[dict[str, Any]] = []

    def not_ready() -> bool:
        response = httpx.get(f"{embedded.base}/readyz", timeout=10)
        if response.status_code == 503:
            seen.append(response.json())
        return bool(seen)

    _wait("a 503 from /readyz", not_ready, [embedded.proc], timeout_s=30)
    assert seen[0]["error"]["code"] == "not_ready"
    assert seen[0]["checks"]["database"] == "ok" and seen[0]["checks"]["worker"] != "ok"

    _wait("a restarted worker", lambda: embedded.worker_pid() != worker, [embedded.proc])
    _wait("the job final", _final(embedded.factory, [slow]), [embedded.proc])
    jobs = assert_settled_once(embedded.factory, embedded.storage, [slow], [embedded.log_path])
    assert (jobs[slow].status, jobs[slow].attempts) == ("succeeded", 2)
    assert httpx.get(f"{embedded.base}/readyz", timeout=10).status_code == 200


def test_embedded_time_limit_fails_the_job_and_frees_the_worker(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    # The solo pool has no Celery time limits: the sandbox's wall clock (just below the job time
    # limit) kills the job's process and fails the job; the reaper's backstop, for an attempt
    # that cannot stop, is tested in tests/worker/test_reaper.py.
    service = Embedded(tmp_path, MPQ_JOB_TIME_LIMIT_S="25")
    try:
        service.start()
        assert service.proc is not None
        endless = {**SLOW_SPEC, "finetune": {**SLOW_SPEC["finetune"], "epochs": 10_000}}
        stuck = service.submit(endless, zoo_bytes("mlp", "script"))
        quick = service.submit(QUICK_SPEC, zoo_bytes("mlp", "script"))
        _wait("both jobs final", _final(service.factory, [stuck, quick]), [service.proc])
        jobs = assert_settled_once(
            service.factory, service.storage, [stuck, quick], [service.log_path]
        )
        assert (jobs[stuck].status, jobs[stuck].error_code) == ("failed", "time_limit_exceeded")
        assert jobs[stuck].artifacts == [] and jobs[stuck].attempts == 1
        assert jobs[quick].status == "succeeded"  # the worker went on to the next job
        assert jobs[stuck].error_message and "time limit of" in jobs[stuck].error_message
    finally:
        service.close()
