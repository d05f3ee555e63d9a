"""Operations of a job run by a real worker, under ``mpq serve`` with its embedded worker: the
worker's log lines are JSON and carry the job id, and ``/metrics`` shows the job, its stage
durations and the streamed download of its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.api.apptools import SPEC, data_bytes, model_bytes
from tests.api.metrics_text import json_lines, wait_for_scrape
from tests.api.served import served
from tests.support.jobs import wait_for_job

JOB_TIMEOUT_S = 180.0
#: Celery prints its shutdown notices from a signal handler, where logging is not safe.
CELERY_NOTICES = ("worker: ",)
STAGES = "mpq_job_stage_duration_seconds"


def _job_window(lines: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """The lines from the attempt's start to Celery's line saying the task succeeded."""
    start = next(
        i for i, line in enumerate(lines) if line["message"] == f"job {job_id}: attempt 1 started"
    )
    end = next(
        i
        for i, line in enumerate(lines)
        if i > start and line["logger"] == "celery.app.trace" and "succeeded" in line["message"]
    )
    return lines[start : end + 1]


def test_a_job_run_by_the_worker_logs_its_id_and_shows_in_the_metrics(tmp_path: Path) -> None:
    # MPQ_SANDBOX=process: how the job is isolated is not what this test is about.
    with served(tmp_path, worker=True, sandbox="process") as api, api.client() as client:
        model = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
        data = client.post("/v1/datasets", params={"filename": "d.npz"}, content=data_bytes())
        body = {"model_id": model.json()["id"], "dataset_id": data.json()["id"], "spec": SPEC}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        job = wait_for_job(
            client, job_id, timeout_s=JOB_TIMEOUT_S, describe=lambda: api.proc.tail(80)
        )
        assert job["status"] == "succeeded", job["error"]
        download = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt")
        assert download.status_code == 200 and download.content

        artifact = {"method": "GET", "route": "/v1/jobs/{job_id}/artifacts/{name}"}
        found = wait_for_scrape(
            client, lambda s: s.value("mpq_http_requests_total", status="200", **artifact) == 1
        )
        assert found.value("mpq_http_request_duration_seconds_count", **artifact) == 1
        assert found.value("mpq_jobs", status="succeeded") == 1
        assert found.value("mpq_queue_depth") == 0
        stages = set(job["result"]["timings"]) | {"download", "upload"}
        assert {"intake", "analyze", "export"} <= stages
        for stage in stages:
            assert found.value(f"{STAGES}_count", stage=stage) == 1, stage
        lines = json_lines(api.stop_and_check_log(), CELERY_NOTICES)  # the worker's lines too

    window = _job_window(lines, job_id)
    from_worker = [line for line in window if line["logger"].startswith(("worker.", "celery."))]
    assert len(from_worker) >= 3, window
    assert all(line.get("job_id") == job_id for line in from_worker), from_worker
    assert not any("job_id" in line for line in lines if line["logger"] == "mpq.access")
