"""``POST /v1/jobs`` as one multipart form (files and spec at once): the model, datasets and job
are created together, and a refused part leaves nothing in storage or the database."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpq_service.db import session_scope
from mpq_service.storage_keys import model_key
from mpq_service.tables import Dataset, Job, ModelFile
from tests.api.apptools import (
    SPEC,
    Service,
    data_bytes,
    model_and_dataset,
    model_bytes,
    pickled_model_bytes,
    running_service,
)

LIMIT = 256 * 1024


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path, max_upload_bytes=LIMIT) as service:
        yield service


def _files(**parts: bytes) -> dict[str, tuple[str, bytes, str]]:
    names = {"model": "mlp.pt", "data": "calib.npz", "eval_data": "eval.npz"}
    return {k: (names[k], v, "application/octet-stream") for k, v in parts.items()}


def _post(svc: Service, headers: dict[str, str], spec: Any = SPEC, **parts: bytes) -> Any:
    data = {} if spec is None else {"spec": spec if isinstance(spec, str) else json.dumps(spec)}
    return svc.client.post("/v1/jobs", files=_files(**parts), data=data, headers=headers)


def _counts(svc: Service) -> tuple[int, int, int]:
    with session_scope(svc.sessions) as session:
        return (
            session.query(ModelFile).count(),
            session.query(Dataset).count(),
            session.query(Job).count(),
        )


def _assert_nothing_left(svc: Service) -> None:
    assert svc.stored_files() == []
    assert not any(svc.storage._tmp.iterdir())
    assert _counts(svc) == (0, 0, 0)
    assert svc.enqueued == []


def test_form_creates_model_datasets_and_job(svc: Service) -> None:
    headers = svc.key("acme")
    model, data, evals = model_bytes(), data_bytes(), data_bytes(8)
    r = _post(svc, headers, model=model, data=data, eval_data=evals)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert r.headers["retry-after"] == "2"
    assert job["status"] == "queued" and job["spec"]["budgets"] == ["avg-bits=4"]
    assert svc.enqueued == [job["id"]]

    m = svc.client.get(f"/v1/models/{job['model_id']}", headers=headers).json()
    assert m["filename"] == "mlp.pt" and m["format"] == "torchscript"
    assert m["size"] == len(model) and m["sha256"] == hashlib.sha256(model).hexdigest()
    d = svc.client.get(f"/v1/datasets/{job['dataset_id']}", headers=headers).json()
    assert d["format"] == "npz" and d["sha256"] == hashlib.sha256(data).hexdigest()
    e = svc.client.get(f"/v1/datasets/{job['eval_dataset_id']}", headers=headers).json()
    assert e["filename"] == "eval.npz" and e["size"] == len(evals)

    with session_scope(svc.sessions) as session:
        row = session.get(ModelFile, job["model_id"])
        assert row is not None
        assert row.storage_key == model_key(row.tenant_id, row.id)
        stored = svc.storage.root / row.storage_key
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(model).hexdigest()
    assert len(svc.stored_files()) == 3
    got = svc.client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
    assert got["status"] == "queued" and got["model_id"] == job["model_id"]


def test_spec_first_and_without_eval_data(svc: Service) -> None:
    headers = svc.key("acme")
    boundary = "b0undary"
    parts = [("spec", None, json.dumps(SPEC).encode()), ("model", "m.pt", model_bytes())]
    parts.append(("data", "d.npz", data_bytes()))
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"'.encode()
            + (f'; filename="{f}"'.encode() if f else b"")
            + b"\r\n\r\n"
            + v
            + b"\r\n"
            for n, f, v in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = svc.client.post("/v1/jobs", content=body, headers={**headers, **ctype})
    assert r.status_code == 202, r.text
    assert r.json()["eval_dataset_id"] is None
    assert _counts(svc) == (1, 1, 1)


def test_json_route_still_works_and_other_types_are_415(svc: Service) -> None:
    headers = svc.key("acme")
    model_id, data_id = model_and_dataset(svc, headers)
    body = {"model_id": model_id, "dataset_id": data_id, "spec": SPEC}
    r = svc.client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202 and r.json()["model_id"] == model_id
    r = svc.client.post("/v1/jobs", content=b"x", headers={**headers, "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = svc.client.post(
        "/v1/jobs", content=b"{", headers={**headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"budgets": ["avg-bits=banana"]}, "invalid_budget"),
        ({"budgets": ["avg-bits=4"], "colour": "red"}, "invalid_spec"),
        ("{not json", "invalid_request"),
        ("[1, 2]", "invalid_request"),
    ],
)
def test_bad_spec_is_422_and_leaves_nothing(svc: Service, spec: Any, code: str) -> None:
    headers = svc.key("acme")
    r = _post(svc, headers, spec=spec, model=model_bytes(), data=data_bytes())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    _assert_nothing_left(svc)


@pytest.mark.parametrize("missing", ["model", "data", "spec"])
def test_missing_part_is_422_invalid_request(svc: Service, missing: str) -> None:
    headers = svc.key("acme")
    files = {"model": model_bytes(), "data": data_bytes()}
    files.pop(missing, None)
    r = _post(svc, headers, spec=None if missing == "spec" else SPEC, **files)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert missing in r.json()["error"]["message"]
    _assert_nothing_left(svc)


def test_unknown_part_is_refused(svc: Service) -> None:
    headers = svc.key("acme")
    r = svc.client.post(
        "/v1/jobs",
        files={
            **_files(model=model_bytes(), data=data_bytes()),
            "extra": ("x", b"1", "text/plain"),
        },
        data={"spec": json.dumps(SPEC)},
        headers=headers,
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    _assert_nothing_left(svc)


def test_pickled_model_is_415_and_leaves_nothing(svc: Service) -> None:
    headers = svc.key("acme")
    # data first, so the refused model comes after a stored file
    r = svc.client.post(
        "/v1/jobs",
        files={**_files(data=data_bytes()), **_files(model=pickled_model_bytes())},
        data={"spec": json.dumps(SPEC)},
        headers=headers,
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "model_pickle"
    _assert_nothing_left(svc)


def test_bad_eval_data_is_415_and_leaves_nothing(svc: Service) -> None:
    headers = svc.key("acme")
    r = _post(svc, headers, model=model_bytes(), data=data_bytes(), eval_data=model_bytes())
    assert r.status_code == 415 and r.json()["error"]["code"] == "data_format"
    _assert_nothing_left(svc)


def test_file_over_the_limit_is_413_and_leaves_nothing(svc: Service) -> None:
    headers = svc.key("acme")
    # The whole body is under the form's declared limit, one file is over the per-file limit.
    r = _post(svc, headers, model=model_bytes(), data=b"PK\x03\x04" + b"\0" * LIMIT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    _assert_nothing_left(svc)


def test_declared_length_over_the_limit_is_refused_before_reading(svc: Service) -> None:
    headers = svc.key("acme")
    r = _post(svc, headers, model=model_bytes(), data=b"\0" * (4 * LIMIT + 2 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    _assert_nothing_left(svc)


def test_chunked_file_over_the_limit_is_413(svc: Service) -> None:
    headers = svc.key("acme")
    boundary = "xyz"

    def body() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n\r\n'.encode()
        yield model_bytes()
        yield f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\n'.encode()
        for _ in range(2 * LIMIT // 65536 + 1):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = svc.client.post("/v1/jobs", content=body(), headers={**headers, **ctype})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    _assert_nothing_left(svc)


def test_truncated_or_boundaryless_body_is_422(svc: Service) -> None:
    headers = svc.key("acme")
    ctype = {"Content-Type": "multipart/form-data; boundary=q"}
    body = b'--q\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model_bytes()
    r = svc.client.post("/v1/jobs", content=body, headers={**headers, **ctype})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = svc.client.post(
        "/v1/jobs", content=b"x", headers={**headers, "Content-Type": "multipart/form-data"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    _assert_nothing_left(svc)


def test_unauthenticated_form_stores_nothing_and_tenants_stay_apart(svc: Service) -> None:
    r = svc.client.post(
        "/v1/jobs", files=_files(model=model_bytes(), data=data_bytes()), data={"spec": "{}"}
    )
    assert r.status_code == 401
    _assert_nothing_left(svc)

    a, b = svc.key("tenant-a"), svc.key("tenant-b")
    job = _post(svc, a, model=model_bytes(), data=data_bytes()).json()
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/models/{job['model_id']}",
        f"/v1/datasets/{job['dataset_id']}",
    ):
        assert svc.client.get(path, headers=a).status_code == 200
        r = svc.client.get(path, headers=b)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert svc.client.get("/v1/models", headers=b).json()["items"] == []
    # b cannot reference a's uploads from JSON either
    body = {"model_id": job["model_id"], "dataset_id": job["dataset_id"], "spec": SPEC}
    assert svc.client.post("/v1/jobs", json=body, headers=b).status_code == 404
    with session_scope(svc.sessions) as session:
        (row,) = session.query(ModelFile).all()
        assert f"/{row.tenant_id}/" in f"/{row.storage_key}"


def test_openapi_documents_both_bodies(svc: Service) -> None:
    doc = svc.client.get("/openapi.json").json()
    content = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert content["multipart/form-data"]["schema"]["required"] == ["model", "data", "spec"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert "model_id" in doc["components"]["schemas"]["JobCreate"]["properties"]
