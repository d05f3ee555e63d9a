"""Operations against a real ``mpq serve --no-worker``: ``/metrics`` (requests by route template
and status, latency histograms, jobs by status, queue depth, a database outage, the token),
request ids (echoed, generated, replaced when insane, in every error body) and JSON log lines
carrying them; and, in process, an unhandled error's 500. Metrics are read with Prometheus's own
parser.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from api.app import create_app
from mpq_service.migrate import upgrade
from mpq_service.settings import Settings
from tests.api.apptools import SPEC, data_bytes, model_bytes
from tests.api.metrics_text import Scrape, json_lines, scrape, wait_for_scrape
from tests.api.served import Served, open_upload, served
from tests.support.tcp_proxy import TcpProxy

FRESH_ID = re.compile(r"[0-9a-f]{32}")
REQUESTS = "mpq_http_requests_total"
LATENCY = "mpq_http_request_duration_seconds"


def _requests(found: Scrape, method: str, route: str, status: int) -> float | None:
    return found.value(REQUESTS, method=method, route=route, status=str(status))


def test_metrics_count_requests_by_route_template_and_status_with_latency_histograms(
    tmp_path: Path,
) -> None:
    with served(tmp_path) as api, api.client() as client:
        job_ids = [str(uuid.uuid4()) for _ in range(2)]
        assert client.get("/v1/jobs").status_code == 200
        for job_id in job_ids:
            assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get("/no/such/page").status_code == 404
        assert client.post("/v1/jobs", json={"spec": "nonsense"}).status_code == 422

        found = wait_for_scrape(client, lambda s: _requests(s, "POST", "/v1/jobs", 422) == 1)
        assert _requests(found, "GET", "/v1/jobs", 200) == 1
        assert _requests(found, "GET", "/v1/jobs/{job_id}", 404) == 2
        assert _requests(found, "GET", "unmatched", 404) == 1
        assert _requests(found, "POST", "/v1/jobs", 422) == 1
        routes = {labels["route"] for labels in found.labels_of(REQUESTS)}
        assert not any(job_id in route for route in routes for job_id in job_ids), routes
        one_route = {"method": "GET", "route": "/v1/jobs/{job_id}"}
        assert found.value(f"{LATENCY}_count", **one_route) == 2
        assert found.value(f"{LATENCY}_bucket", le="+Inf", **one_route) == 2
        assert (found.value(f"{LATENCY}_sum", **one_route) or 0) > 0
        assert found.families[LATENCY].type == "histogram"
        api.stop_and_check_log()


def test_metrics_show_jobs_by_status_and_the_queue_depth(tmp_path: Path) -> None:
    with served(tmp_path) as api, api.client() as client:
        model = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
        data = client.post("/v1/datasets", params={"filename": "d.npz"}, content=data_bytes())
        job = {"model_id": model.json()["id"], "dataset_id": data.json()["id"], "spec": SPEC}
        ids = [client.post("/v1/jobs", json=job).json()["id"] for _ in range(3)]
        assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200

        found = scrape(client)  # no worker: the others wait in the queue
        assert found.value("mpq_database_up") == 1
        assert found.value("mpq_jobs", status="queued") == 2
        assert found.value("mpq_jobs", status="cancelled") == 1
        assert found.value("mpq_jobs", status="running") == 0
        assert found.value("mpq_queue_depth") == 2
        api.stop_and_check_log()


def test_a_scrape_with_the_database_down_is_200_with_database_up_0(
    served_on_proxied_pg: tuple[TcpProxy, Served],
) -> None:
    proxy, api = served_on_proxied_pg
    with api.client() as client:
        assert scrape(client).value("mpq_database_up") == 1
        proxy.cut()
        found = scrape(client)  # 200, asserted by scrape()
        assert found.value("mpq_database_up") == 0
        assert "mpq_jobs" not in found.families and "mpq_queue_depth" not in found.families
        assert found.labels_of(REQUESTS)  # the request metrics still come
        proxy.restore()
        assert scrape(client).value("mpq_database_up") == 1
    api.stop_and_check_log()


def test_metrics_require_the_token_when_one_is_set(tmp_path: Path) -> None:
    with served(tmp_path, metrics_token="scrape-secret") as api:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            refused = client.get("/metrics")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            wrong = client.get("/metrics", headers={"Authorization": f"Bearer {api.key}"})
            assert wrong.status_code == 401
            wait_for_scrape(
                client,
                lambda s: _requests(s, "GET", "/metrics", 401) == 2,
                Authorization="Bearer scrape-secret",
            )
        api.stop_and_check_log()


def test_a_client_that_goes_away_is_counted_as_499_and_logged_with_its_request_id(
    tmp_path: Path,
) -> None:
    with served(tmp_path) as api:
        sock = open_upload(api, "/v1/models?filename=m.pt", 10_000_000)
        sock.sendall(b"\0" * 1000)
        sock.close()
        api.wait_for_log("client disconnected during POST /v1/models")
        with api.client() as client:
            wait_for_scrape(client, lambda s: _requests(s, "POST", "/v1/models", 499) == 1)
        lines = json_lines(api.stop_and_check_log())
    gone = [line for line in lines if "client disconnected" in line["message"]]
    assert len(gone) == 1 and FRESH_ID.fullmatch(gone[0]["request_id"]), gone
    access = [line for line in lines if line.get("request_id") == gone[0]["request_id"]]
    assert {(line["logger"], line.get("status")) for line in access} >= {("mpq.access", 499)}


def _error_id(response: httpx.Response) -> str:
    rid: str = response.json()["error"]["request_id"]
    assert rid == response.headers["X-Request-ID"], response.text
    return rid


def test_request_ids_are_echoed_or_generated_and_in_every_error_body(tmp_path: Path) -> None:
    with served(tmp_path) as api, api.client() as client:
        sane = "req-42.retry_1"
        assert (
            client.get("/v1/jobs", headers={"X-Request-ID": sane}).headers["X-Request-ID"] == sane
        )
        assert FRESH_ID.fullmatch(client.get("/healthz").headers["X-Request-ID"])
        for insane in ("x" * 129, "has space", "semi;colon", ""):
            rid = client.get("/healthz", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
            assert FRESH_ID.fullmatch(rid), (insane, rid)

        assert _error_id(client.get("/v1/jobs/nope", headers={"X-Request-ID": sane})) == sane
        assert FRESH_ID.fullmatch(_error_id(client.get("/nothing/here")))
        assert FRESH_ID.fullmatch(_error_id(httpx.get(f"{api.base_url}/v1/jobs")))  # 401
        assert FRESH_ID.fullmatch(_error_id(client.get("/v1/jobs", params={"status": "x\0"})))
        assert FRESH_ID.fullmatch(_error_id(client.post("/v1/jobs", content=b"{")))  # 422
        api.stop_and_check_log()


def test_log_lines_are_json_carrying_the_request_id(tmp_path: Path) -> None:
    with served(tmp_path) as api, api.client() as client:
        rid = f"trace-{uuid.uuid4().hex}"
        assert client.get("/v1/jobs", headers={"X-Request-ID": rid}).status_code == 200
        lines = json_lines(api.stop_and_check_log())  # served's output is a file: auto is JSON
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert all(line["ts"].endswith("Z") for line in lines)
    mine = [line for line in lines if line.get("request_id") == rid]
    assert len(mine) == 1, mine
    assert mine[0]["logger"] == "mpq.access" and mine[0]["level"] == "INFO"
    assert (mine[0]["method"], mine[0]["route"], mine[0]["status"]) == ("GET", "/v1/jobs", 200)
    assert mine[0]["duration_ms"] >= 0 and mine[0]["path"] == "/v1/jobs"
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own, too


def test_served_is_text_when_asked(tmp_path: Path) -> None:
    with served(tmp_path, log_format="text") as api, api.client() as client:
        rid = f"trace-{uuid.uuid4().hex}"
        client.get("/v1/jobs", headers={"X-Request-ID": rid})
        log = api.stop_and_check_log()
    line = next(line for line in log.splitlines() if rid in line)
    assert re.fullmatch(
        rf"\S+Z INFO mpq\.access: GET /v1/jobs 200 \S+ ms \[request_id={rid}\]", line
    )


def test_an_unhandled_error_is_a_500_carrying_the_request_id_and_counted(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    upgrade(settings.database_url)
    app = create_app(settings, enqueue=lambda _job_id: None)

    @app.get("/boom/{what}")
    def boom(what: str) -> None:
        raise RuntimeError(f"a bug about {what}")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom/x", headers={"X-Request-ID": "bug-report-7"})
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "code": "internal_error",
                "message": "internal server error",
                "request_id": "bug-report-7",
            }
        }
        assert response.headers["X-Request-ID"] == "bug-report-7"
        found = Scrape(client.get("/metrics").text)
        assert _requests(found, "GET", "/boom/{what}", 500) == 1
