"""The OpenAPI document against the real service: schemathesis generates requests from
``/openapi.json`` for every operation and checks what a real ``mpq serve`` answers (status codes
documented, content types, headers, bodies matching their schemas, no 5xx).

Path ids are real ones (an uploaded model, a dataset, a job and its artifact) for every other
example, so operations are checked past their 404s too.
"""

from __future__ import annotations

import hashlib
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from mpq_service.db import make_engine, session_scope
from mpq_service.db import make_sessionmaker as sessions_of
from mpq_service.job_status import JobStatus
from mpq_service.settings import Settings
from mpq_service.storage_keys import artifact_key
from mpq_service.tables import Artifact, Job, utcnow
from tests.api.apptools import SPEC, data_bytes, model_bytes
from tests.api.served import Served, served

EXAMPLES_PER_OPERATION = 50
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _finish_with_an_artifact(api: Served, job_id: str) -> None:
    """What a worker leaves: one stored artifact and a succeeded job with a result."""
    body = b'{"avg_bits": 4.0}'
    engine = make_engine(f"sqlite:///{api.data_dir / 'mpq.db'}")
    try:
        with session_scope(sessions_of(engine)) as session:
            job = session.get(Job, job_id)
            assert job is not None
            key = artifact_key(job.tenant_id, job.id, "report.json")
            path = api.data_dir / "objects" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            session.add(
                Artifact(
                    job_id=job.id,
                    tenant_id=job.tenant_id,
                    name="report.json",
                    size=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    storage_key=key,
                    content_type="application/json",
                )
            )
            job.status = JobStatus.SUCCEEDED.value
            job.stage = "export"
            job.progress = 1.0
            job.result = {"budgets": ["avg-bits=4"], "device": "cpu"}
            job.finished_at = utcnow()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    """A served API holding one of everything, and the ids to put into paths."""
    with served(tmp_path_factory.mktemp("contract")) as api, api.client() as client:
        model = client.post("/v1/models", content=model_bytes(), params={"filename": "m.pt"})
        data = client.post("/v1/datasets", content=data_bytes(), params={"filename": "d.npz"})
        assert model.status_code == data.status_code == 201, model.text + data.text
        ids = {"model_id": model.json()["id"], "dataset_id": data.json()["id"]}
        job = client.post("/v1/jobs", json={**ids, "spec": SPEC})
        assert job.status_code == 202, job.text  # no worker: it stays queued
        finished = client.post("/v1/jobs", json={**ids, "spec": SPEC}).json()["id"]
        _finish_with_an_artifact(api, finished)
        yield api, {**ids, "job_id": finished, "name": "report.json"}


def _operations() -> list[tuple[str, str]]:
    """``(METHOD, path)`` of every operation, read off the app's document at collection time
    (the test itself checks the document the served process answers)."""
    app = create_app(
        Settings(_env_file=None, data_dir=Path(tempfile.mkdtemp())),  # type: ignore[call-arg]
        enqueue=lambda _job: None,
    )
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]
    found = [(method.upper(), path) for path, item in paths.items() for method in item]
    # Deletes last, so that the other operations see the real resources first.
    return sorted(found, key=lambda op: op[0] == "DELETE")


@pytest.fixture(scope="module")
def api_schema(api: tuple[Served, dict[str, str]]) -> Any:
    return schemathesis.openapi.from_url(api[0].base_url + "/openapi.json")


def _real_ids(case: Any, ids: dict[str, str]) -> None:
    """Every other generated example gets the real ids (chosen by the example's own content,
    so a failure replays the same way)."""
    params = case.path_parameters or {}
    if params and zlib.crc32(repr(sorted(params.items())).encode()) % 2 == 0:
        case.path_parameters = {k: ids.get(k, v) for k, v in params.items()}


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_response_matches_the_openapi_document(
    method: str, path: str, api: tuple[Served, dict[str, str]], api_schema: Any
) -> None:
    served_api, ids = api
    strategy = api_schema[path][method].as_strategy()

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,  # the same examples on every run: CI is repeatable
    )
    def check(case: Any) -> None:
        _real_ids(case, ids)
        response = case.call(base_url=served_api.base_url, headers=served_api.headers)
        assert response.status_code < 500, response.text
        case.validate_response(response, checks=CHECKS)

    check()


def test_an_unauthenticated_call_gets_the_documented_401(
    api: tuple[Served, dict[str, str]],
) -> None:
    served_api, _ = api
    doc = httpx.get(served_api.base_url + "/openapi.json").json()
    r = httpx.get(served_api.base_url + "/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    documented = doc["paths"]["/v1/jobs"]["get"]["responses"]["401"]
    assert documented["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert set(r.json()["error"]) >= {"code", "message"}


def test_the_document_describes_the_whole_job_spec(api: tuple[Served, dict[str, str]]) -> None:
    doc = httpx.get(api[0].base_url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    spec = schemas["JobSpec"]["properties"]
    from mpq_core.spec import JobSpec

    assert set(spec) == {f for f in JobSpec.__dataclass_fields__} | {"schema_version", "kind"}
    assert spec["granularity"]["enum"] == ["channel", "32", "64", "128"]
    assert spec["bits"]["default"] == [2, 3, 4, 5, 6, 8]
    assert schemas["JobPublic"]["properties"]["status"] == {
        "$ref": "#/components/schemas/JobStatus"
    }
    assert "see mpq_core" not in str(doc)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op.get("description") or op.get("summary"), f"{method} {path}"
            for status, response in op["responses"].items():
                content = response.get("content", {}).get("application/json")
                if content:
                    assert "example" in content, f"{method} {path} {status}"
