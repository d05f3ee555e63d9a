"""Jobs through the REST API: create (202, queued, enqueued), poll, list with filters and
cursors, cancel, delete, and artifacts of a job a simulated worker finished."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.storage_keys import artifact_key
from mpq_service.tables import Artifact, Job, utcnow
from tests.api.apptools import SPEC, Service, model_and_dataset, running_service


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path) as service:
        yield service


def _create(svc: Service, headers: dict[str, str], model_id: str, data_id: str) -> dict[str, Any]:
    r = svc.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "dataset_id": data_id, "spec": SPEC},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def _finish(svc: Service, job_id: str, artifacts: dict[str, bytes] | None = None) -> None:
    """What a worker does at the end: artifacts into storage and rows, job succeeded."""
    with session_scope(svc.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, body in (artifacts or {}).items():
            key = artifact_key(job.tenant_id, job.id, name)
            svc.storage.put_bytes(key, body)
            session.add(
                Artifact(
                    job_id=job.id,
                    tenant_id=job.tenant_id,
                    name=name,
                    size=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    storage_key=key,
                )
            )
        job.status = JobStatus.SUCCEEDED.value
        job.stage = "done"
        job.progress = 1.0
        job.result = {"avg_bits": 4.0}
        job.finished_at = utcnow()


def test_create_job_is_202_queued_and_enqueued(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job = _create(svc, headers, model_id, data_id)
    assert job["status"] == "queued"
    assert job["progress"] == 0.0 and job["error"] is None and job["result"] is None
    assert job["spec"]["budgets"] == ["avg-bits=4"] and job["spec"]["kind"] == "mpq.job_spec"
    assert svc.enqueued == [job["id"]]

    r = svc.client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert r.status_code == 200
    assert r.headers["retry-after"] == "2"
    assert r.json()["status"] == "queued"


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"budgets": ["avg-bits=banana"]}, "invalid_budget"),
        ({"budgets": ["avg-bits=4"], "method": "guess"}, "invalid_spec"),  # schema_version 1
        ({"budgets": ["avg-bits=4"], "analysis": {"method": "guess"}}, "invalid_spec"),
        ({"budgets": ["avg-bits=4"], "finetune": {"lr": -1}}, "spec_out_of_range"),
        ({"budgets": ["avg-bits=4"], "finetune": {"rate": 1}}, "invalid_spec"),
        ({"budgets": ["avg-bits=4"], "colour": "red"}, "invalid_spec"),
        ({"budgets": []}, "invalid_spec"),
        ({"budgets": ["avg-bits=4"], "bits": ["x"]}, "spec_type"),
    ],
)
def test_bad_spec_is_422_with_its_code(svc: Service, spec: dict[str, Any], code: str) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    r = svc.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "dataset_id": data_id, "spec": spec},
        headers=headers,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert svc.enqueued == []


def test_a_schema_version_1_spec_is_accepted_and_stored_as_version_2(svc: Service) -> None:
    # Clients written against the flat spec keep working; what is stored is the current shape.
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    flat = {"budgets": ["avg-bits=4"], "method": "kl", "finetune_epochs": 0, "finetune_lr": 0.01}
    r = svc.client.post(
        "/v1/jobs",
        json={"model_id": model_id, "dataset_id": data_id, "spec": flat},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    spec = r.json()["spec"]
    assert spec["schema_version"] == 2
    assert spec["analysis"]["method"] == "kl"
    assert spec["finetune"]["epochs"] == 0 and spec["finetune"]["lr"] == 0.01
    assert "method" not in spec and "finetune_epochs" not in spec


def test_malformed_request_is_422_invalid_request(svc: Service) -> None:
    headers = svc.key("acme")
    r = svc.client.post("/v1/jobs", json={"model_id": "x"}, headers=headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_request"
    r = svc.client.get("/v1/jobs", params={"status": "sleeping"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = svc.client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


def test_unknown_model_or_job_is_404(svc: Service) -> None:
    headers = svc.key("acme")
    _, data_id = model_and_dataset(svc, headers)
    r = svc.client.post(
        "/v1/jobs", json={"model_id": "nope", "dataset_id": data_id, "spec": SPEC}, headers=headers
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = svc.client.get("/v1/jobs/nope", headers=headers)
    assert r.status_code == 404 and r.json() == {
        "error": {
            "code": "not_found",
            "message": "job 'nope' not found",
            "request_id": r.headers["X-Request-ID"],
        }
    }


def test_list_newest_first_with_cursor_pagination_and_filters(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    other_model, _ = model_and_dataset(svc, headers)
    ids = [_create(svc, headers, model_id, data_id)["id"] for _ in range(5)]
    other = _create(svc, headers, other_model, data_id)["id"]
    newest_first = [other, *reversed(ids)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = svc.client.get("/v1/jobs", params=params, headers=headers).json()
        assert len(body["items"]) <= 2
        seen += [j["id"] for j in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3

    by_model = svc.client.get("/v1/jobs", params={"model_id": model_id}, headers=headers).json()
    assert [j["id"] for j in by_model["items"]] == list(reversed(ids))

    _finish(svc, ids[1])
    done = svc.client.get("/v1/jobs", params={"status": "succeeded"}, headers=headers).json()
    assert [j["id"] for j in done["items"]] == [ids[1]]
    queued = svc.client.get("/v1/jobs", params={"status": "queued"}, headers=headers).json()
    assert ids[1] not in [j["id"] for j in queued["items"]] and len(queued["items"]) == 5
    assert (done["total"], queued["total"]) == (1, 5)


def test_list_total_counts_every_page_and_filters_by_dataset_and_time(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    _, other_data = model_and_dataset(svc, headers)
    first = [_create(svc, headers, model_id, data_id)["id"] for _ in range(3)]
    on_other = _create(svc, headers, model_id, other_data)["id"]
    with session_scope(svc.sessions) as session:  # an older job, created a day ago
        job = session.get(Job, first[0])
        assert job is not None
        job.created_at = utcnow() - timedelta(days=1)

    def listed(**params: Any) -> tuple[list[str], int]:
        r = svc.client.get("/v1/jobs", params={"limit": 2, **params}, headers=headers)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["items"]], r.json()["total"]

    assert listed() == ([on_other, first[2]], 4)
    assert listed(dataset_id=other_data) == ([on_other], 1)
    assert listed(dataset_id=data_id)[1] == 3
    cutoff = (utcnow() - timedelta(hours=1)).isoformat()
    assert listed(created_before=cutoff) == ([first[0]], 1)
    assert listed(created_after=cutoff)[1] == 3
    # Another tenant's jobs are not counted.
    assert svc.client.get("/v1/jobs", headers=svc.key("other")).json()["total"] == 0

    r = svc.client.get("/v1/jobs", params={"created_after": "2026-12-01T00:00:00"}, headers=headers)
    assert r.status_code == 422 and "time zone" in r.json()["error"]["message"]
    r = svc.client.get("/v1/jobs", params={"created_after": "yesterday"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_cancel_then_delete(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job_id = _create(svc, headers, model_id, data_id)["id"]

    r = svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    r = svc.client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.json()["status"] == "cancelled" and "retry-after" not in r.headers

    r = svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"

    r = svc.client.delete(f"/v1/jobs/{job_id}", headers=headers)
    assert r.status_code == 204 and r.content == b""
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404
    assert svc.client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 404


def test_deleting_a_queued_job_cancels_and_deletes_it(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job_id = _create(svc, headers, model_id, data_id)["id"]
    kept = _create(svc, headers, model_id, data_id)["id"]

    r = svc.client.delete(f"/v1/jobs/{job_id}", headers=headers)
    assert r.status_code == 204
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404
    with session_scope(svc.sessions) as session:
        assert session.get(Job, job_id) is None
    # A worker handed the deleted job's id finds nothing to run; the other job is untouched.
    assert svc.client.get(f"/v1/jobs/{kept}", headers=headers).json()["status"] == "queued"


def test_cancelling_a_finished_job_is_409(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job_id = _create(svc, headers, model_id, data_id)["id"]
    _finish(svc, job_id)
    r = svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "succeeded"


def test_artifacts_list_download_and_delete(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job_id = _create(svc, headers, model_id, data_id)["id"]
    assert svc.client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json() == {"items": []}
    quantized = bytes(range(256)) * 4000  # several chunks
    report = b'{"accuracy": 0.9}'
    _finish(svc, job_id, {"model.pt": quantized, "report.json": report})

    r = svc.client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.json()["status"] == "succeeded" and r.json()["result"] == {"avg_bits": 4.0}
    assert "retry-after" not in r.headers

    listed = svc.client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()["items"]
    assert [a["name"] for a in listed] == ["model.pt", "report.json"]
    assert listed[0]["size"] == len(quantized)
    assert listed[0]["sha256"] == hashlib.sha256(quantized).hexdigest()

    r = svc.client.get(listed[0]["url"], headers=headers)
    assert r.status_code == 200
    assert r.content == quantized
    assert r.headers["content-length"] == str(len(quantized))
    assert r.headers["content-disposition"] == 'attachment; filename="model.pt"'

    r = svc.client.get(f"/v1/jobs/{job_id}/artifacts/missing.bin", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    artifact_files = [p for p in svc.stored_files() if "jobs" in p.parts]
    assert len(artifact_files) == 2
    assert svc.client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert not any(p.exists() for p in artifact_files)
    with session_scope(svc.sessions) as session:
        assert session.query(Artifact).count() == 0


def test_downloads_carry_etag_and_digest_and_serve_byte_ranges(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    job_id = _create(svc, headers, model_id, data_id)["id"]
    body = bytes(range(256)) * 5000  # several chunks
    _finish(svc, job_id, {"model.pt": body})
    url = f"/v1/jobs/{job_id}/artifacts/model.pt"
    digest = hashlib.sha256(body)

    r = svc.client.get(url, headers=headers)
    etag = f'"{digest.hexdigest()}"'
    assert (r.status_code, r.content) == (200, body)
    assert r.headers["etag"] == etag and r.headers["accept-ranges"] == "bytes"
    assert r.headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"

    def get(**more: str) -> Any:
        return svc.client.get(url, headers={**headers, **more})

    r = get(**{"If-None-Match": etag})
    assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", etag)
    assert get(**{"If-None-Match": '"other"'}).status_code == 200

    # Resuming an interrupted download: the rest from a byte offset, in several chunks.
    r = get(Range="bytes=70000-")
    assert (r.status_code, r.content) == (206, body[70000:])
    assert r.headers["content-range"] == f"bytes 70000-{len(body) - 1}/{len(body)}"
    assert r.headers["content-length"] == str(len(body) - 70000)
    r = get(Range="bytes=10-19")
    assert (r.status_code, r.content) == (206, body[10:20])
    r = get(Range="bytes=-5")
    assert (r.status_code, r.content) == (206, body[-5:])
    r = get(Range="bytes=10-19", **{"If-Range": etag})
    assert (r.status_code, r.content) == (206, body[10:20])

    # A range of another version, several ranges, or one that does not parse: the whole file.
    for more in ({"Range": "bytes=10-19", "If-Range": '"old"'}, {"Range": "bytes=0-1,5-6"},
                 {"Range": "lines=1-2"}):  # fmt: skip
        r = get(**more)
        assert (r.status_code, r.content) == (200, body), more

    r = get(Range=f"bytes={len(body)}-")
    assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{len(body)}"

    r = svc.client.head(url, headers={**headers, "Range": "bytes=0-99"})
    assert (r.status_code, r.content, r.headers["content-length"]) == (206, b"", "100")
    r = svc.client.head(url, headers=headers)
    assert (r.status_code, r.headers["content-length"], r.headers["etag"]) == (
        200, str(len(body)), etag
    )  # fmt: skip


def test_healthz_and_readyz(svc: Service) -> None:
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    assert svc.client.get("/readyz").json() == {"status": "ok"}
    assert svc.client.get("/docs").status_code == 200
    assert "/v1/jobs" in svc.client.get("/openapi.json").json()["paths"]


def test_readyz_is_503_when_the_database_is_gone(svc: Service) -> None:
    db = Path(svc.settings.database_url.removeprefix("sqlite:///"))
    svc.client.app.state.engine.dispose()  # type: ignore[attr-defined]
    db.parent.rename(db.parent.with_name("moved"))
    r = svc.client.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_the_root_redirects_to_the_web_pages(svc: Service) -> None:
    r = svc.client.get("/", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (307, "/ui/")


def test_unknown_route_uses_the_error_shape(svc: Service) -> None:
    r = svc.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_importing_the_app_does_not_import_torch() -> None:
    # The import-linter contracts (pyproject.toml) check every import statement, but not what a
    # package's __init__ runs when one of its modules is imported (mpq_core's, say): this one
    # runtime check covers that for the API process.
    code = "import sys, api.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_celery_enqueue_writes_to_the_filesystem_broker(tmp_path: Path) -> None:
    from api.queue import celery_enqueue
    from mpq_service.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    celery_enqueue(settings)("job-123")
    (message,) = [p for p in settings.broker_dir.rglob("*.msg")]
    assert "job-123" in message.read_text() and "mpq.run_job" in message.read_text()
