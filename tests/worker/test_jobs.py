"""run_job without a broker: success with stored artifacts, the sensitivity cache, failures with
stable codes, the attempt cap, and cancellation while running."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

import mpq_core.pipeline
import worker.child_job
from api import actions
from mpq_service.db import session_scope
from mpq_service.settings import Settings
from mpq_service.storage import LocalStorage, make_storage
from mpq_service.storage_keys import artifact_key, tenant_prefix
from mpq_service.tables import Artifact, Job, SensitivityCache, Tenant, utcnow
from tests.support.files import npz_bytes
from tests.support.net import free_port
from tests.worker.conftest import Env, mlp_npz
from worker.jobs import run_job


def _count(env: Env, model: type[Any]) -> int:
    with env.session_factory() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_job_succeeds_with_artifacts_then_second_job_reuses_sensitivities(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = env.upload_model(env.model_bytes)
    dataset_id = env.upload_data(mlp_npz())
    first_id = env.create_job(model_id=model_id, dataset_id=dataset_id)

    job = env.run_job(first_id)
    assert (job.status, job.error_code, job.error_message) == ("succeeded", None, None)
    assert job.progress == 1.0 and job.attempts == 1
    assert job.started_at is not None and job.finished_at is not None
    names = {a.name for a in job.artifacts}
    assert {"model.pt", "model.mpq.safetensors", "allocation.json", "report.json"} <= names
    # The runtime exports and the plots of a job run in the sandbox come back too.
    assert {"model.compressed.pt2", "model.onnx", "bits.svg", "sensitivity.png"} <= names
    types = {".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png"}
    for artifact in job.artifacts:
        assert artifact.storage_key == artifact_key(env.tenant_id, first_id, artifact.name)
        assert env.storage.size(artifact.storage_key) == artifact.size > 0
        assert len(artifact.sha256) == 64
        suffix = Path(artifact.name).suffix
        assert artifact.content_type == types.get(suffix, "application/octet-stream")
    model = torch.jit.load(
        io.BytesIO(env.storage.read_bytes(artifact_key(env.tenant_id, first_id, "model.pt")))
    )
    assert model(torch.randn(3, 16)).shape == (3, 5)
    report = json.loads(
        env.storage.read_bytes(artifact_key(env.tenant_id, first_id, "report.json"))
    )

    result = job.result
    assert result is not None
    assert result["sensitivity"] == {"key": job.sensitivity_key, "reused": False}
    assert result["budgets"] == report["budgets"]
    assert result["budgets"][0]["achieved"] <= result["budgets"][0]["asked"] + 1e-9
    assert set(result["metrics"]) == {"float", "quantized", "finetuned"}
    assert result["allocation"] == report["allocation"]
    assert result["sizes"]["packed_checkpoint_bytes"] > 0
    assert set(result["timings"]) == set(mpq_core.pipeline.STAGES)
    assert _count(env, SensitivityCache) == 1

    # Same model, data and analysis settings (a different budget): the stored table is used and
    # the sensitivities are not computed again. A mark planted in the stored table shows up in
    # the second job's sensitivity.json only if the table was reused, not recomputed.
    # Rows keep their object's key and readers use it, so a table stored under the earlier
    # layout (sensitivity/<tenant>/<key>.json) is still found.
    with session_scope(env.session_factory) as s:
        row = s.scalars(select(SensitivityCache)).one()
        legacy = f"sensitivity/{env.tenant_id}/{row.key}.json"
        table = json.loads(env.storage.read_bytes(row.storage_key))
        table["meta"]["planted"] = "by the test"
        env.storage.put_bytes(legacy, json.dumps(table).encode())
        env.storage.delete(row.storage_key)
        row.storage_key = legacy
    spec = {**json.loads(json.dumps(job.spec)), "budgets": ["avg-bits=5"]}
    second = env.run_job(env.create_job(model_id=model_id, dataset_id=dataset_id, spec=spec))
    assert second.status == "succeeded", second.error_message
    assert second.sensitivity_key == job.sensitivity_key
    assert second.result is not None and second.result["sensitivity"]["reused"] is True
    reused = json.loads(
        env.storage.read_bytes(artifact_key(env.tenant_id, second.id, "sensitivity.json"))
    )
    assert reused["meta"]["planted"] == "by the test"
    assert _count(env, SensitivityCache) == 1


@pytest.mark.parametrize(
    ("arrays", "codes"),
    [
        (
            lambda: {"input_0": np.zeros((8, 16), "f4"), "input_1": np.zeros((8, 16), "f4")},
            {"data_input_count"},
        ),
        (lambda: {"input": np.zeros((8, 7), "f4")}, {"data_mismatch", "data_shape"}),
    ],
    ids=["two-inputs", "wrong-width"],
)
def test_data_that_does_not_fit_fails_with_its_code(
    env: Env, arrays: Callable[[], dict[str, np.ndarray]], codes: set[str]
) -> None:
    job_id = env.create_job(dataset_id=env.upload_data(npz_bytes(**arrays())))
    job = env.run_job(job_id)
    assert job.status == "failed"
    assert job.error_code in codes
    assert job.error_message and "input" in job.error_message
    assert job.artifacts == [] and job.finished_at is not None


def _child_code(body: str) -> tuple[str, ...]:
    """A child command line that runs the real job entry point after ``body`` (Python run in
    the sandboxed child: how a test makes the pipeline misbehave in the other process)."""
    code = (
        f"{body}\nimport sys\nfrom mpq_core.isolated_job import main\nsys.exit(main(sys.argv[1:]))"
    )
    return ("-c", code, "{input}/job.json", "{out}")


def test_unexpected_error_fails_with_internal_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        worker.child_job,
        "CHILD_ARGV",
        _child_code(
            "import mpq_core.pipeline as p\n"
            "def boom(*a, **k):\n    raise RuntimeError('solver exploded\\nsecond line')\n"
            "p.allocate = boom"
        ),
    )
    job = env.run_job(env.create_job())
    assert (job.status, job.error_code) == ("failed", "internal_error")
    assert job.error_message == "RuntimeError: solver exploded"


def test_missing_upload_fails_with_input_missing(env: Env) -> None:
    job_id = env.create_job()
    with env.session_factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        env.storage.delete(job.dataset.storage_key)
    failed = env.run_job(job_id)
    assert (failed.status, failed.error_code) == ("failed", "input_missing")


def test_storage_down_during_a_job_fails_it_with_storage_unavailable(
    env: Env, tmp_path: Path
) -> None:
    # An S3 server that refuses connections, after the retries: a code the user can act on,
    # not internal_error.
    down = make_storage(
        Settings(
            data_dir=tmp_path / "unused",
            storage="s3",
            s3_bucket="mpq",
            s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
            s3_access_key="k",
            s3_secret_key="s",
            s3_max_attempts=2,
        )
    )
    job_id = env.create_job()
    run_job(
        job_id,
        settings=env.settings,
        session_factory=env.session_factory,
        storage=down,
        workdir=env.workdir,
    )
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", "storage_unavailable"), job.error_message
    assert job.error_message and "submit it again" in job.error_message


def test_job_that_killed_its_worker_too_often_fails(make_env: Callable[..., Env]) -> None:
    # A message redelivered after the worker died: the job is still "running", its heartbeat
    # stale (older than job_stale_after_s).
    env = make_env(job_max_attempts=2)
    dead = utcnow() - timedelta(hours=1)
    job_id = env.create_job(status="running", attempts=2, heartbeat_at=dead)
    job = env.run_job(job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_lost_repeatedly", 2)
    assert job.error_message and "2 time(s)" in job.error_message
    # One attempt left: it runs (and counts).
    other = env.run_job(env.create_job(status="running", attempts=1, heartbeat_at=dead))
    assert (other.status, other.attempts) == ("succeeded", 2)


def test_final_job_is_left_alone(env: Env) -> None:
    job_id = env.create_job(status="cancelled")
    job = env.run_job(job_id)
    assert (job.status, job.attempts, job.started_at) == ("cancelled", 0, None)


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _cancel_in_the_database(env: Env, job_id: str) -> None:
    with session_scope(env.session_factory) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status = "cancelled"


def _delete_through_the_api(env: Env, job_id: str) -> None:
    with session_scope(env.session_factory) as s:
        tenant = s.get(Tenant, env.tenant_id)
        assert tenant is not None
        actions.delete_job(s, env.storage, job_id, tenant)


@pytest.mark.parametrize(
    "stop", [_cancel_in_the_database, _delete_through_the_api], ids=["cancel", "delete"]
)
def test_cancellation_or_deletion_while_running_stops_the_job(
    env: Env, monkeypatch: pytest.MonkeyPatch, stop: Callable[[Env, str], None]
) -> None:
    job_id = env.create_job()
    token = f"mpq-test-cancel-{job_id}"
    # The child's allocation stage hangs (it would write a file after 120 s); cancelling the job
    # in the database, as POST /v1/jobs/{id}/cancel does, or deleting it as DELETE
    # /v1/jobs/{id} does, must kill it and store nothing.
    monkeypatch.setattr(
        worker.child_job,
        "CHILD_ARGV",
        _child_code(
            f"TOKEN = {token!r}\n"
            "import time, mpq_core.pipeline as p\n"
            "def hang(*a, **k):\n    time.sleep(120)\n    raise SystemExit('not killed')\n"
            "p.allocate = hang"
        ),
    )

    def stop_when_allocating() -> None:
        for _ in range(600):
            with session_scope(env.session_factory) as s:
                job = s.get(Job, job_id)
                assert job is not None
                allocating = job.stage == "allocate"
            if allocating:
                stop(env, job_id)
                return
            time.sleep(0.1)

    stopper = threading.Thread(target=stop_when_allocating)
    stopper.start()
    run_job(
        job_id,
        settings=env.settings,
        session_factory=env.session_factory,
        storage=env.storage,
        workdir=env.workdir,
    )
    stopper.join()
    with env.session_factory() as s:
        job = s.get(Job, job_id)
        if stop is _delete_through_the_api:
            assert job is None
        else:
            assert job is not None
            assert (job.status, job.error_code, job.result) == ("cancelled", None, None)
    assert _count(env, Artifact) == 0
    assert not env.storage.exists(artifact_key(env.tenant_id, job_id, "model.pt"))
    assert _processes_with(token) == [], "the child outlived its stopped job"
    assert isinstance(env.storage, LocalStorage)
    jobs_folder = env.storage.root / tenant_prefix(env.tenant_id) / "jobs"
    assert not jobs_folder.exists() or not any(jobs_folder.rglob("*"))
