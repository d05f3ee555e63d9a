"""One real Celery worker process, on the server-less filesystem broker, runs a job end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from mpq_service.celery_config import TASK_RUN_JOB, make_celery
from tests.worker.conftest import Env

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_real_worker_runs_a_job(make_env: Callable[..., Env], tmp_path: Path) -> None:
    env = make_env()
    job_id = env.create_job()
    queue = f"mpq-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    worker_env = {
        **os.environ,
        "MPQ_DATA_DIR": str(env.settings.data_dir),
        "MPQ_DATABASE_URL": env.settings.database_url,
        "MPQ_STORAGE": "local",
        "MPQ_BROKER_URL": "",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", queue, "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        app = make_celery(env.settings)
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            job = env.job(job_id)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        worker_log = log_path.read_text(errors="replace")[-6000:]
        assert job.status == "succeeded", (
            f"job {job.status} ({job.error_code}: {job.error_message}); worker exit "
            f"{proc.poll()}; worker log:\n{worker_log}"
        )
        assert job.progress == 1.0 and job.attempts == 1
        assert {a.name for a in job.artifacts} >= {"model.pt", "report.json"}
        assert all(env.storage.exists(a.storage_key) for a in job.artifacts)
    finally:
        _stop(proc)
