"""Tenant isolation: another tenant's model, dataset, job and artifacts are 404, never 403."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.storage_keys import artifact_key
from mpq_service.tables import Artifact, Job
from tests.api.apptools import SPEC, Service, model_and_dataset, running_service


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path) as service:
        yield service


def _assert_404(r: httpx.Response) -> None:
    assert r.status_code == 404, f"{r.status_code}: {r.text}"
    assert r.json()["error"]["code"] == "not_found"


def test_other_tenants_resources_are_404(svc: Service) -> None:
    a, b = svc.key("tenant-a"), svc.key("tenant-b")
    model_a, data_a = model_and_dataset(svc, a)
    r = svc.client.post(
        "/v1/jobs", json={"model_id": model_a, "dataset_id": data_a, "spec": SPEC}, headers=a
    )
    assert r.status_code == 202
    job_a = r.json()["id"]
    running_job = svc.client.post(
        "/v1/jobs", json={"model_id": model_a, "dataset_id": data_a, "spec": SPEC}, headers=a
    ).json()["id"]
    body = b"quantized"
    with session_scope(svc.sessions) as session:
        job = session.get(Job, job_a)
        assert job is not None
        key = artifact_key(job.tenant_id, job.id, "model.pt")
        svc.storage.put_bytes(key, body)
        session.add(
            Artifact(
                job_id=job.id,
                tenant_id=job.tenant_id,
                name="model.pt",
                size=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                storage_key=key,
            )
        )
        job.status = JobStatus.SUCCEEDED.value

    _assert_404(svc.client.get(f"/v1/models/{model_a}", headers=b))
    _assert_404(svc.client.get(f"/v1/datasets/{data_a}", headers=b))
    _assert_404(svc.client.get(f"/v1/jobs/{job_a}", headers=b))
    _assert_404(svc.client.get(f"/v1/jobs/{job_a}/artifacts", headers=b))
    _assert_404(svc.client.get(f"/v1/jobs/{job_a}/artifacts/model.pt", headers=b))
    _assert_404(svc.client.post(f"/v1/jobs/{running_job}/cancel", headers=b))
    _assert_404(svc.client.delete(f"/v1/jobs/{job_a}", headers=b))
    assert svc.client.get("/v1/models", headers=b).json()["items"] == []
    assert svc.client.get("/v1/datasets", headers=b).json()["items"] == []
    assert svc.client.get("/v1/jobs", headers=b).json()["items"] == []

    # B cannot build a job on A's uploads, alone or mixed with its own.
    model_b, data_b = model_and_dataset(svc, b)
    enqueued = list(svc.enqueued)
    for model_id, data_id in [(model_a, data_a), (model_a, data_b), (model_b, data_a)]:
        r = svc.client.post(
            "/v1/jobs", json={"model_id": model_id, "dataset_id": data_id, "spec": SPEC}, headers=b
        )
        _assert_404(r)
    r = svc.client.post(
        "/v1/jobs",
        json={"model_id": model_b, "dataset_id": data_b, "eval_dataset_id": data_a, "spec": SPEC},
        headers=b,
    )
    _assert_404(r)
    assert svc.enqueued == enqueued

    # Nothing B did touched A's resources.
    assert svc.client.get(f"/v1/jobs/{job_a}", headers=a).json()["status"] == "succeeded"
    assert svc.client.get(f"/v1/jobs/{running_job}", headers=a).json()["status"] == "queued"
    r = svc.client.get(f"/v1/jobs/{job_a}/artifacts/model.pt", headers=a)
    assert r.status_code == 200 and r.content == body
    assert [j["id"] for j in svc.client.get("/v1/jobs", headers=a).json()["items"]] == [
        running_job,
        job_a,
    ]
