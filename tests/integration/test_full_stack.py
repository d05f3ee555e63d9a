"""The whole REST flow on the production components, each a real server or process:

- a fresh Postgres database (migrated with :func:`mpq_service.migrate.upgrade`, dropped afterwards);
- Redis as the Celery broker, on a database of its own claimed for this run (flushed afterwards);
- a real SeaweedFS S3 server (``tests/support/s3server.py``) as the object storage;
- a real Celery worker (prefork pool, concurrency 1) and the API served by a real uvicorn, both
  subprocesses configured only by ``MPQ_*`` environment variables, as in docker-compose.yml.

Over HTTP: upload a TorchScript model, calibration and eval data, create a job, poll it to the
end, list its artifacts, download them through the 307 to a presigned S3 URL, load ``model.pt``
with stock ``torch.jit.load`` and check that it scores exactly as the job's report says, and
restore ``model.mpq.safetensors`` bit-exactly into the original model.

Isolation from other test runs sharing the Redis server: the API sends jobs to Celery's default
queue (there is no queue setting), so each run claims an empty Redis database of its own
(``redis_url``, tests/support/redis_db.py); ``MPQ_TEST_REDIS_URL`` moves the server,
``MPQ_TEST_POSTGRES_URL`` the Postgres admin database.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F

from api.auth import create_key
from mpq_core.intake import load_model
from mpq_core.packed_checkpoint import load_packed_checkpoint, restore_into
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from tests.conftest import zoo_data
from tests.support.files import npz_bytes
from tests.support.jobs import wait_for_job
from tests.support.processes import (
    ServiceNotReady,
    ServiceProcess,
    start_celery_worker,
    start_http_service,
)
from tests.support.s3server import S3Server

REPO = Path(__file__).resolve().parents[2]

START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 180.0

SPEC: dict[str, Any] = {
    "budgets": ["avg-bits=4"],
    "batch_size": 16,
    "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
}
ARTIFACTS = {"model.pt", "model.mpq.safetensors", "report.json", "allocation.json"}


# --- Postgres ------------------------------------------------------------------------------


@pytest.fixture
def pg_database(new_pg_url: Callable[[], str]) -> str:
    """A fresh Postgres database migrated to head (its URL); dropped afterwards."""
    url = new_pg_url()
    upgrade(url)
    return url


# --- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    base_url: str
    api_key: str
    api: ServiceProcess
    worker: ServiceProcess
    s3: S3Server
    database_url: str

    def logs(self) -> str:
        return "\n".join(
            [self.worker.describe(), self.api.describe(), f"--- weed:\n{self.s3.log_tail(20)}"]
        )


def _service_env(
    database_url: str, broker_url: str, s3: S3Server, bucket: str, pepper: str, data_dir: Path
) -> dict[str, str]:
    """The environment of the API and the worker: only MPQ_* settings (as in compose)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env.update(
        {
            "MPQ_DATABASE_URL": database_url,
            "MPQ_BROKER_URL": broker_url,
            "MPQ_STORAGE": "s3",
            "MPQ_S3_ENDPOINT_URL": s3.endpoint_url,
            "MPQ_S3_BUCKET": bucket,
            "MPQ_S3_ACCESS_KEY": s3.access_key,
            "MPQ_S3_SECRET_KEY": s3.secret_key,
            "MPQ_S3_REGION": s3.region,
            "MPQ_API_KEY_PEPPER": pepper,
            "MPQ_DATA_DIR": str(data_dir),
            "MPQ_JOB_TIME_LIMIT_S": "600",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1",
            # Tiny models: extra intra-op threads only spin on a busy test machine.
            "OMP_NUM_THREADS": "2",
        }
    )
    return env


def _start_worker(env: dict[str, str], workdir: Path) -> ServiceProcess:
    return start_celery_worker("worker", env, workdir, workdir / "worker.log", node="it")


def _start_api(
    env: dict[str, str], workdir: Path, worker: ServiceProcess
) -> tuple[ServiceProcess, str]:
    """uvicorn on a free port, polled until /readyz answers 200 (retried on a port race)."""

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
        ]  # fmt: skip

    try:
        return start_http_service(
            "api", command, env=env, cwd=workdir, log_path=workdir / "api.log",
            timeout_s=START_TIMEOUT_S,
        )  # fmt: skip
    except ServiceNotReady as exc:
        raise AssertionError(f"{exc}\n{worker.describe()}") from None


@pytest.fixture
def stack(
    s3_server: S3Server,
    pg_database: str,
    redis_url: str,
    tmp_path: Path,
) -> Iterator[Stack]:
    pepper = secrets.token_hex(16)
    engine = make_engine(pg_database)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            api_key = create_key(session, "integration", "ci", pepper=pepper)
    finally:
        engine.dispose()
    bucket = f"mpq-it-{secrets.token_hex(4)}"
    env = _service_env(pg_database, redis_url, s3_server, bucket, pepper, tmp_path / "data")
    worker = _start_worker(env, tmp_path)
    procs = [worker]
    try:
        api, base_url = _start_api(env, tmp_path, worker)
        procs.append(api)
        yield Stack(base_url, api_key, api, worker, s3_server, pg_database)
    finally:
        for proc in reversed(procs):
            proc.stop()
        _delete_bucket(s3_server, bucket)


def _delete_bucket(s3: S3Server, bucket: str) -> None:
    with contextlib.suppress(Exception):
        client = s3.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)


# --- the flow --------------------------------------------------------------------------------


def _scores(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def test_rest_flow_on_postgres_redis_s3_and_a_real_worker(
    stack: Stack, zoo_bytes: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    model_bytes = zoo_bytes("cnn", "script")
    calib = zoo_data("cnn", 64, seed=1)
    test = zoo_data("cnn", 40, seed=2)
    assert calib.labels is not None and test.labels is not None
    calib_npz = npz_bytes(input=calib.inputs[0].numpy(), labels=calib.labels.numpy())
    eval_npz = npz_bytes(input=test.inputs[0].numpy(), labels=test.labels.numpy())

    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with (
        httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as api,
        httpx.Client(timeout=30) as s3,  # presigned URLs carry their own auth: no bearer key
    ):

        def upload(path: str, filename: str, body: bytes) -> str:
            r = api.post(
                path,
                params={"filename": filename},
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 201, f"POST {path}: {r.status_code} {r.text}\n{stack.logs()}"
            doc = r.json()
            assert doc["sha256"] == hashlib.sha256(body).hexdigest() and doc["size"] == len(body)
            return str(doc["id"])

        model_id = upload("/v1/models", "cnn.pt", model_bytes)
        dataset_id = upload("/v1/datasets", "calib.npz", calib_npz)
        eval_id = upload("/v1/datasets", "eval.npz", eval_npz)

        r = api.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "dataset_id": dataset_id,
                "eval_dataset_id": eval_id,
                "spec": SPEC,
            },
        )
        assert r.status_code == 202, f"POST /v1/jobs: {r.status_code} {r.text}\n{stack.logs()}"
        job_id = r.json()["id"]
        assert r.headers["Location"] == f"/v1/jobs/{job_id}"

        job = wait_for_job(
            api,
            job_id,
            timeout_s=JOB_TIMEOUT_S,
            interval_s=0.3,
            check=lambda: None if stack.worker.alive() and stack.api.alive() else "a process died",
            describe=stack.logs,
        )
        assert job["status"] == "succeeded", f"job {job['status']}: {job['error']}\n{stack.logs()}"
        assert job["progress"] == 1.0 and job["attempts"] == 1
        t_job = time.monotonic() - t0

        r = api.get(f"/v1/jobs/{job_id}/artifacts")
        assert r.status_code == 200, r.text
        listed = {a["name"]: a for a in r.json()["items"]}
        assert set(listed) >= ARTIFACTS, sorted(listed)

        def download(name: str) -> bytes:
            art = listed[name]
            r = api.get(art["url"], follow_redirects=False)
            assert r.status_code == 307, f"GET {art['url']}: {r.status_code} {r.text}"
            location = r.headers["Location"]
            assert location.startswith(stack.s3.endpoint_url + "/"), location
            got = s3.get(location)
            assert got.status_code == 200, f"presigned GET: {got.status_code} {got.text}"
            body = got.content
            assert len(body) == art["size"] and hashlib.sha256(body).hexdigest() == art["sha256"]
            return body

        report = json.loads(download("report.json"))
        pt_bytes = download("model.pt")
        packed_bytes = download("model.mpq.safetensors")

    # The job's summary and its report agree.
    final = report["metrics"]["finetuned"]
    assert final is not None and report["finetune"]["epochs_run"] == 1
    assert job["result"]["metrics"]["finetuned"] == final
    assert report["data"]["eval_samples"] == test.num_samples == final["samples"]

    # model.pt loads with stock torch and scores as the report says.
    quantized = torch.jit.load(io.BytesIO(pt_bytes), map_location="cpu").eval()
    x, y = test.inputs[0], test.labels
    out = _scores(quantized, x, SPEC["batch_size"])
    accuracy = float((out.argmax(-1) == y).double().mean())
    loss = float(F.cross_entropy(out.double(), y))
    assert accuracy == final["accuracy"], (accuracy, final)
    assert loss == pytest.approx(final["loss"], rel=1e-5, abs=1e-6), (loss, final)

    # The packed checkpoint restores model.pt's weights bit-exactly into the original model.
    packed_path = tmp_path / "model.mpq.safetensors"
    packed_path.write_bytes(packed_bytes)
    original = load_model(model_bytes)
    restore_into(original, load_packed_checkpoint(packed_path))
    restored = dict(original.module.named_parameters())
    downloaded = dict(quantized.named_parameters())
    assert restored.keys() == downloaded.keys()
    for name, p in downloaded.items():
        assert torch.equal(restored[name].detach(), p.detach()), name
    assert torch.equal(_scores(original.module, x, SPEC["batch_size"]), out)

    # The reported stage timings cover the whole pipeline; the flow stays quick.
    assert set(report["timings"]) >= {"analyze", "finetune", "export"}
    assert t_job < JOB_TIMEOUT_S
