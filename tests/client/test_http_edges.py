"""What a real server rarely does on demand, from a scripted HTTP server: a 503 with
``Retry-After`` retried on a GET but not on a POST, error bodies without the API's envelope, the
request id, and an unreachable host."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from mpq_client import (
    Client,
    MpqApiError,
    MpqConnectionError,
    RateLimited,
    ServerError,
    Unavailable,
)
from tests.client.httpd import QuietHandler, serving
from tests.support.net import free_port

JOB = {"id": "j1", "status": "running", "stage": "analyze", "progress": 0.5, "new_field": 1}


class Scripted(ThreadingHTTPServer):
    """Answers each request with the next scripted ``(status, body, headers)``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: deque[tuple[int, Any, dict[str, str]]] = deque()
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(QuietHandler):
    server: Scripted

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append(f"{self.command} {self.path}")
        status, body, headers = self.server.script.popleft()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.reply(status, raw, {"Content-Type": "application/json", **headers})

    do_GET = do_POST = do_DELETE = _answer


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    with serving(Scripted()) as (server,):
        yield server


def _busy(code: str = "database_unavailable") -> tuple[int, Any, dict[str, str]]:
    return 503, {"error": {"code": code, "message": "try again"}}, {"Retry-After": "0"}


def test_a_get_is_retried_after_503_and_429(scripted: Scripted) -> None:
    scripted.script.extend([_busy(), (429, {"error": {"code": "slow_down", "message": "m"}}, {}),
                            (200, JOB, {})])  # fmt: skip
    with Client(scripted.url, "k", retries=2) as mpq:
        job = mpq.job("j1")
    assert (job.id, job.status, job.stage, job.progress) == ("j1", "running", "analyze", 0.5)
    assert scripted.seen == ["GET /v1/jobs/j1"] * 3


def test_retries_run_out_as_unavailable_with_retry_after(scripted: Scripted) -> None:
    scripted.script.extend([_busy(), _busy("storage_unavailable")])
    with Client(scripted.url, "k", retries=1) as mpq, pytest.raises(Unavailable) as busy:
        mpq.job("j1")
    assert (busy.value.status, busy.value.code, busy.value.retry_after) == (
        503,
        "storage_unavailable",
        0.0,
    )
    assert not isinstance(busy.value, RateLimited)


def test_a_post_is_not_retried(scripted: Scripted) -> None:
    scripted.script.extend([_busy("queue_unavailable"), (202, JOB, {})])
    with Client(scripted.url, "k") as mpq, pytest.raises(Unavailable) as busy:
        mpq.submit("m", "d", budgets="avg-bits=4")
    assert busy.value.code == "queue_unavailable"
    assert scripted.seen == ["POST /v1/jobs"]


def test_an_answer_without_the_error_envelope_keeps_its_status_and_text(
    scripted: Scripted,
) -> None:
    scripted.script.append((502, b"bad gateway from the proxy", {"X-Request-ID": "req-7"}))
    with Client(scripted.url, "k", retries=0) as mpq, pytest.raises(ServerError) as failed:
        mpq.cancel("j1")
    assert isinstance(failed.value, MpqApiError)
    assert (failed.value.status, failed.value.code) == (502, "http_502")
    assert failed.value.message == "bad gateway from the proxy"
    assert failed.value.request_id == "req-7"


def test_an_unreachable_service_is_a_connection_error() -> None:
    nowhere = Client(f"http://127.0.0.1:{free_port()}", "k", retries=1)
    with nowhere, pytest.raises(MpqConnectionError):
        nowhere.job("j1")
