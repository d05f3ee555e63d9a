"""Deleting uploads through the REST API: the row and the stored file go, another tenant's
upload is a 404, an upload used by a queued or running job is a 409 ``in_use`` naming the job,
and jobs that used a deleted upload stay in the history without it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mpq_service.db import session_scope
from mpq_service.tables import Dataset, Job, ModelFile
from tests.api.apptools import SPEC, Service, model_and_dataset, running_service


@pytest.fixture(params=["sqlite", "postgres"])
def svc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """The app on each backend: the in-use check locks rows, and ``ON DELETE SET NULL`` is the
    database's own work."""
    overrides = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("new_pg_url")()
    with running_service(tmp_path, **overrides) as service:
        yield service


def _job(svc: Service, headers: dict[str, str], model_id: str, data_id: str, **more: str) -> str:
    body = {"model_id": model_id, "dataset_id": data_id, "spec": SPEC, **more}
    r = svc.client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_delete_removes_the_row_and_the_stored_file(svc: Service, kind: str) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    ident = model_id if kind == "models" else data_id
    before = set(svc.stored_files())

    r = svc.client.delete(f"/v1/{kind}/{ident}", headers=headers)
    assert r.status_code == 204 and r.content == b""
    assert svc.client.get(f"/v1/{kind}/{ident}", headers=headers).status_code == 404
    gone = before - set(svc.stored_files())
    assert len(gone) == 1 and ident in gone.pop().name
    assert svc.client.delete(f"/v1/{kind}/{ident}", headers=headers).status_code == 404


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_another_tenants_upload_is_404_and_kept(svc: Service, kind: str) -> None:
    model_id, data_id = model_and_dataset(svc, svc.key("acme"))
    ident = model_id if kind == "models" else data_id
    files = svc.stored_files()
    r = svc.client.delete(f"/v1/{kind}/{ident}", headers=svc.key("intruder"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert svc.stored_files() == files


@pytest.mark.parametrize("kind", ["models", "datasets", "eval"])
def test_an_upload_used_by_an_active_job_is_409_in_use(svc: Service, kind: str) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    _, eval_id = model_and_dataset(svc, headers)
    job_id = _job(svc, headers, model_id, data_id, eval_dataset_id=eval_id)
    path = {
        "models": f"/v1/models/{model_id}",
        "datasets": f"/v1/datasets/{data_id}",
        "eval": f"/v1/datasets/{eval_id}",
    }[kind]
    files = svc.stored_files()

    r = svc.client.delete(path, headers=headers)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "in_use" and job_id in error["message"]
    assert "cancel" in error["message"]
    assert svc.stored_files() == files and svc.client.get(path, headers=headers).status_code == 200

    # Once the job has ended, the upload can go; the job stays, naming no upload.
    assert svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    assert svc.client.delete(path, headers=headers).status_code == 204
    job = svc.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    field = {"models": "model_id", "datasets": "dataset_id", "eval": "eval_dataset_id"}[kind]
    assert job[field] is None and job["status"] == "cancelled"


def test_a_job_on_a_deleted_upload_is_404(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    assert svc.client.delete(f"/v1/models/{model_id}", headers=headers).status_code == 204
    body = {"model_id": model_id, "dataset_id": data_id, "spec": SPEC}
    r = svc.client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert model_id in r.json()["error"]["message"]
    with session_scope(svc.sessions) as session:
        assert session.query(Job).count() == 0
        assert session.get(ModelFile, model_id) is None
        assert session.get(Dataset, data_id) is not None
