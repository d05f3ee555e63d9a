"""The Celery app's configuration, a cheap import, and the hard time limit hook (no broker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError

import worker.tasks
from mpq_service.celery_config import DEFAULT_QUEUE, TASK_RUN_JOB, make_celery
from mpq_service.settings import Settings
from tests.worker.conftest import Env

REPO = Path(__file__).resolve().parents[2]


def test_config_for_long_jobs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, job_time_limit_s=3600, database_url="sqlite://")
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == 3600
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    transport = conf.broker_transport_options
    assert transport["visibility_timeout"] > conf.task_time_limit
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_default_queue == DEFAULT_QUEUE
    for option in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        folder = Path(transport[option])
        assert folder.is_dir() and folder.is_relative_to(settings.broker_dir)


def test_the_workers_app_registers_the_task_without_importing_torch(tmp_path: Path) -> None:
    # What `celery -A worker.celery_app worker` finds, in a process with only MPQ_DATA_DIR set.
    # torch belongs in the prefork child that runs the task (imported inside it), never in the
    # parent (no CUDA before the fork). import-linter cannot tell a function-level import from a
    # module-level one, so this stays a runtime check.
    # The worker imports its task modules itself (conf.imports): the probe must not.
    code = (
        "import sys, worker.celery_app as m;"
        "m.app.loader.import_default_modules();"
        "assert 'torch' not in sys.modules, 'torch imported';"
        f"assert {TASK_RUN_JOB!r} in m.app.tasks"
    )
    env = {"MPQ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_hard_time_limit_fails_the_job_from_the_parent(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = env.create_job(status="running", attempts=1)
    lost = env.create_job(status="running", attempts=1)
    fake = worker.tasks._Resources(0, env.settings, env.engine, env.session_factory, env.storage)
    monkeypatch.setattr(worker.tasks, "resources", lambda: fake)
    task = worker.tasks.run_job_task
    task.on_failure(TimeLimitExceeded(10), "task-1", [running], {}, None)
    task.on_failure(WorkerLostError("killed"), "task-2", [lost], {}, None)
    job = env.job(running)
    assert (job.status, job.error_code) == ("failed", "time_limit_exceeded")
    assert env.job(lost).status == "running"  # re-queued by the broker; attempts decide
