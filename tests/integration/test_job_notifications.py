"""A real job's events and webhook, through ``mpq serve`` with its real worker (SQLite, local
storage, the filesystem broker): the event stream shows the job's stages as the worker runs them
and ends with the succeeded job; the worker's webhook dispatcher posts the final job to a real
receiver, retries it after a 500, and signs it with the secret the embedded service generated
under its data directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mpq_core.progress import STAGES
from mpq_service.webhook_signature import verify_signature
from mpq_service.webhooks import SECRET_FILE
from tests.api.served import served
from tests.support.sse import sse_events
from tests.support.webhook_receiver import webhook_receiver
from tests.worker.conftest import SPEC, mlp_npz

JOB_TIMEOUT_S = 180.0


def test_a_real_jobs_events_and_webhook(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    with (
        webhook_receiver(statuses=[500]) as receiver,
        served(
            tmp_path,
            worker=True,
            webhook_allow_private="true",
            webhook_interval_s="0.2",
            webhook_retry_delays_s="[0.5]",
        ) as api,
        api.client(timeout_s=JOB_TIMEOUT_S) as client,
    ):
        model = client.post("/v1/models", params={"filename": "m.pt"}, content=zoo_bytes("mlp", "script"))  # fmt: skip
        data = client.post("/v1/datasets", params={"filename": "d.npz"}, content=mlp_npz())
        assert model.status_code == data.status_code == 201, (model.text, data.text)
        created = client.post(
            "/v1/jobs",
            json={
                "model_id": model.json()["id"],
                "dataset_id": data.json()["id"],
                "spec": SPEC,
                "webhook_url": receiver.url,
            },
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            events = [e for e in sse_events(response) if e.event]
        job = client.get(f"/v1/jobs/{job_id}").json()
        calls = receiver.wait_for_calls(2, timeout_s=60)
        secret = (api.data_dir / SECRET_FILE).read_bytes().strip()
        api.stop_and_check_log()

    assert job["status"] == "succeeded", job["error"]
    progress = [json.loads(e.data) for e in events[:-1]]
    assert {e.event for e in events[:-1]} == {"progress"} and events[-1].event == "final"
    assert json.loads(events[-1].data) == job
    stages = [p["stage"] for p in progress if p["stage"] is not None]
    assert stages and stages == sorted(stages, key=STAGES.index)  # in pipeline order
    fractions = [p["progress"] for p in progress if p["status"] == "running"]
    assert fractions == sorted(fractions)

    assert [c.status for c in calls] == [500, 200]
    for call in calls:
        assert verify_signature(secret, call.headers["x-mpq-signature"], call.body)
    assert json.loads(calls[1].body)["job"] == job
    assert len(receiver.calls) == 2
