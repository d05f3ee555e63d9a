"""``/readyz`` names every dependency that is missing: the broker (the filesystem one, a real
Redis, an unreachable one, whose URL's password never shows) and the embedded worker (the probe
``mpq serve`` registers; the real one is exercised in tests/integration/test_faults.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.app import create_app
from mpq_service.migrate import upgrade
from mpq_service.settings import Settings
from tests.support.net import free_port


@contextmanager
def _client(tmp_path: Path, **overrides: Any) -> Iterator[TestClient]:
    """The app as production runs it: jobs go through the Celery broker of the settings."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", **overrides)  # type: ignore[call-arg]
    upgrade(settings.database_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.engine.dispose()


def test_ready_with_the_filesystem_broker(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        response = client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_ready_with_a_real_redis(tmp_path: Path, redis_url: str) -> None:
    with _client(tmp_path, broker_url=redis_url) as client:
        response = client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_unreachable_broker_is_503_naming_it_without_its_password(tmp_path: Path) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    with _client(tmp_path, broker_url=url) as client:
        response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and body["error"]["code"] == "not_ready"
    assert body["checks"]["database"] == body["checks"]["storage"] == "ok"
    assert "broker" in body["checks"]["broker"] and "not reachable" in body["checks"]["broker"]
    assert body["checks"]["broker"] in body["error"]["message"]
    assert "hunter2-secret" not in response.text


def test_missing_worker_is_503_naming_it(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        problem = "the worker exited with code -9; it is being restarted"
        client.app.state.readiness_probes["worker"] = lambda: problem  # type: ignore[attr-defined]
        response = client.get("/readyz")
        body = response.json()
        assert response.status_code == 503
        assert body["checks"] == {
            "database": "ok",
            "storage": "ok",
            "broker": "ok",
            "worker": problem,
        }
        assert body["error"] == {
            "code": "not_ready",
            "message": problem,
            "request_id": response.headers["X-Request-ID"],
        }
        client.app.state.readiness_probes["worker"] = lambda: None  # type: ignore[attr-defined]
        assert client.get("/readyz").status_code == 200
