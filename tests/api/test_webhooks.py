"""Job webhooks end to end on real components: jobs created through the real app with a
``webhook_url``, made final the way the service makes them final (a worker's failure write, a
cancellation through the API), and the webhook dispatcher posting to a real HTTP receiver on
this machine: retried after a 500, signed with the secret, once per job even with two
dispatchers at once, refused when the address is not public."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.db import session_scope
from mpq_service.settings import Settings
from mpq_service.tables import Job, WebhookDelivery
from mpq_service.webhook_signature import signature_header, verify_signature
from mpq_service.webhook_targets import WebhookTargetError, resolve_target
from mpq_service.webhooks import (
    SECRET_FILE,
    WebhookDispatcher,
    deliver_due,
    queue_finished,
    webhook_secret,
    webhooks_unavailable,
)
from tests.api.apptools import SPEC, Service, data_bytes, model_and_dataset, model_bytes
from tests.api.apptools import running_service as _running_service
from tests.api.test_db import _job, _tenant
from tests.support.imports import top_level_modules_after
from tests.support.threads import run_at_once
from tests.support.webhook_receiver import Receiver, webhook_receiver
from worker.jobs import fail_running_job

SECRET = "whsec-test"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with _running_service(
        tmp_path,
        webhook_secret=SecretStr(SECRET),
        webhook_allow_private=True,
        webhook_retry_delays_s=[0.0, 0.0],
    ) as service:
        yield service


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


def _create(svc: Service, headers: dict[str, str], webhook_url: str | None) -> httpx.Response:
    model_id, dataset_id = model_and_dataset(svc, headers)
    body: dict[str, Any] = {"model_id": model_id, "dataset_id": dataset_id, "spec": SPEC}
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    return svc.client.post("/v1/jobs", json=body, headers=headers)


def _create_from_form(svc: Service, headers: dict[str, str], url: str) -> httpx.Response:
    return svc.client.post(
        "/v1/jobs",
        files={
            "model": ("mlp.pt", model_bytes(), "application/octet-stream"),
            "data": ("calib.npz", data_bytes(), "application/octet-stream"),
        },
        data={"spec": json.dumps(SPEC), "webhook_url": url},
        headers=headers,
    )


def _job_with_webhook(svc: Service, headers: dict[str, str], url: str) -> str:
    response = _create(svc, headers, url)
    assert response.status_code == 202, response.text
    assert response.json()["webhook_url"] == url
    return str(response.json()["id"])


def _fail_as_the_worker_does(svc: Service, job_id: str) -> None:
    with session_scope(svc.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=1))
    fail_running_job(job_id, "boom", "the job broke", session_factory=svc.sessions)


def _delivery(sessions: sessionmaker[Session], job_id: str) -> WebhookDelivery:
    with sessions() as session:
        row = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).one()
        session.expunge(row)
        return row


def test_a_failed_call_is_retried_and_every_call_is_signed(
    svc: Service, receiver: Receiver
) -> None:
    receiver.statuses[:] = [500]
    headers = svc.key("acme")
    job_id = _job_with_webhook(svc, headers, receiver.url)
    dispatcher = WebhookDispatcher(svc.settings, svc.sessions)
    assert dispatcher.run_once() == {}  # still queued: nothing to announce
    _fail_as_the_worker_does(svc, job_id)

    first = dispatcher.run_once()
    assert list(first.values()) == ["pending"]
    assert _delivery(svc.sessions, job_id).last_error == "the receiver answered HTTP 500"
    assert dispatcher.run_once() == {next(iter(first)): "delivered"}

    calls = receiver.calls
    assert [c.status for c in calls] == [500, 200]
    assert calls[0].body == calls[1].body
    assert calls[0].headers["x-mpq-delivery"] == calls[1].headers["x-mpq-delivery"]
    for call in calls:
        assert call.path == "/hook"
        assert call.headers["content-type"] == "application/json"
        assert call.headers["x-mpq-event"] == "job.finished"
        assert verify_signature(SECRET, call.headers["x-mpq-signature"], call.body)
        assert not verify_signature("another-secret", call.headers["x-mpq-signature"], call.body)
        tampered = call.body.replace(b'"failed"', b'"succeeded"')
        assert tampered != call.body
        assert not verify_signature(SECRET, call.headers["x-mpq-signature"], tampered)
    event = json.loads(calls[1].body)
    assert event["event"] == "job.finished"
    assert event["delivery_id"] == calls[1].headers["x-mpq-delivery"]
    assert event["job"] == svc.client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert event["job"]["status"] == "failed" and event["job"]["error"]["code"] == "boom"
    row = _delivery(svc.sessions, job_id)
    assert (row.state, row.attempts, row.last_error) == ("delivered", 2, None)
    assert dispatcher.run_once() == {}  # delivered once, never again
    assert len(receiver.calls) == 2


def test_a_job_cancelled_while_queued_gets_its_webhook(svc: Service, receiver: Receiver) -> None:
    headers = svc.key("acme")
    job_id = _job_with_webhook(svc, headers, receiver.url)
    assert svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200

    outcome = WebhookDispatcher(svc.settings, svc.sessions).run_once()

    assert list(outcome.values()) == ["delivered"]
    (call,) = receiver.calls
    assert json.loads(call.body)["job"]["status"] == "cancelled"


def test_a_running_job_deleted_through_the_api_gets_its_webhook(
    svc: Service, receiver: Receiver
) -> None:
    headers = svc.key("acme")
    job_id = _job_with_webhook(svc, headers, receiver.url)
    with session_scope(svc.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=1))
    assert svc.client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert svc.client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404

    outcome = WebhookDispatcher(svc.settings, svc.sessions).run_once()

    assert list(outcome.values()) == ["delivered"]
    (call,) = receiver.calls
    job = json.loads(call.body)["job"]
    assert (job["id"], job["status"]) == (job_id, "cancelled")


def test_a_job_without_webhook_sends_nothing(svc: Service, receiver: Receiver) -> None:
    headers = svc.key("acme")
    response = _create(svc, headers, None)
    assert response.status_code == 202 and response.json()["webhook_url"] is None
    job_id = response.json()["id"]
    assert svc.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
    assert WebhookDispatcher(svc.settings, svc.sessions).run_once() == {}
    assert receiver.calls == []


def test_delivery_gives_up_after_the_last_retry(svc: Service, receiver: Receiver) -> None:
    receiver.statuses[:] = [503, 500, 502, 500]
    headers = svc.key("acme")
    job_id = _job_with_webhook(svc, headers, receiver.url)
    _fail_as_the_worker_does(svc, job_id)
    dispatcher = WebhookDispatcher(svc.settings, svc.sessions)

    states = [next(iter(dispatcher.run_once().values()), None) for _ in range(4)]

    assert states == ["pending", "pending", "failed", None]  # two retries, then given up
    assert [c.status for c in receiver.calls] == [503, 500, 502]
    row = _delivery(svc.sessions, job_id)
    assert (row.state, row.attempts) == ("failed", 3)
    assert row.last_error == "the receiver answered HTTP 502"


def test_a_host_resolving_to_a_private_address_is_refused_at_delivery(
    svc: Service, receiver: Receiver
) -> None:
    # Accepted while private addresses were allowed; the rule is checked again at each call.
    headers = svc.key("acme")
    url = receiver.url.replace("127.0.0.1", "localhost")
    job_id = _job_with_webhook(svc, headers, url)
    _fail_as_the_worker_does(svc, job_id)
    strict = svc.settings.model_copy(update={"webhook_allow_private": False})

    assert list(WebhookDispatcher(strict, svc.sessions).run_once().values()) == ["failed"]

    assert receiver.calls == []
    row = _delivery(svc.sessions, job_id)
    assert row.attempts == 1
    assert row.last_error is not None and "non-public address" in row.last_error


BAD_URLS = [
    ("ftp://example.com/hook", "http:// or https://"),
    ("https://user:pw@example.com/hook", "credentials"),
    ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ("http://127.0.0.1:8080/hook", "not a public address"),
    ("http://169.254.169.254/latest/meta-data", "not a public address"),
    ("http://[::1]/hook", "not a public address"),
    ("http://localhost/hook", "not a public address"),
    ("https://exa mple.com/", "without spaces"),
    ("https:///hook", "no host"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_a_bad_webhook_url_is_refused_at_submission(tmp_path: Path, url: str, why: str) -> None:
    with _running_service(tmp_path, webhook_secret=SecretStr(SECRET)) as svc:
        headers = svc.key("acme")
        response = _create(svc, headers, url)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"].startswith("webhook_url: ") and why in error["message"]

        form = _create_from_form(svc, headers, url)
        assert form.status_code == 422, form.text
        assert form.json()["error"]["message"] == error["message"]
        listed = svc.client.get("/v1/jobs", headers=headers).json()["items"]
        assert listed == []


def test_a_form_job_keeps_its_webhook_url(svc: Service) -> None:
    headers = svc.key("acme")
    url = "https://hooks.example.com/mpq?team=ml"
    response = _create_from_form(svc, headers, url)
    assert response.status_code == 202, response.text
    job = svc.client.get(f"/v1/jobs/{response.json()['id']}", headers=headers).json()
    assert job["webhook_url"] == url


def test_webhooks_need_a_shared_secret_when_storage_is_s3(tmp_path: Path) -> None:
    s3 = Settings(_env_file=None, data_dir=tmp_path, storage="s3", s3_bucket="b")  # type: ignore[call-arg]
    assert webhooks_unavailable(s3) is not None and webhook_secret(s3) is None
    configured = s3.model_copy(update={"webhook_secret": SecretStr("k")})
    assert webhooks_unavailable(configured) is None and webhook_secret(configured) == b"k"


def test_the_generated_secret_is_kept_private_and_reused(tmp_path: Path) -> None:
    local = Settings(_env_file=None, data_dir=tmp_path / "data")  # type: ignore[call-arg]
    assert webhooks_unavailable(local) is None
    first = webhook_secret(local)
    assert first is not None and len(first) == 64
    assert webhook_secret(local) == first
    path = tmp_path / "data" / SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [SECRET_FILE]


def test_two_dispatchers_post_each_webhook_once(
    session_factory: sessionmaker[Session], receiver: Receiver, tmp_path: Path
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, webhook_allow_private=True
    )
    with session_scope(session_factory) as session:
        tenant = _tenant(session)
        job_ids = [
            _job(session, tenant, status="succeeded", webhook_url=receiver.url).id for _ in range(3)
        ]
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(webhook_pending=True))

    def dispatch(start: threading.Barrier) -> None:
        with httpx.Client(trust_env=False) as client:
            start.wait()
            queue_finished(session_factory)
            start.wait()
            deliver_due(settings, session_factory, client, b"k")

    run_at_once(dispatch)

    posted = sorted(json.loads(c.body)["job"]["id"] for c in receiver.calls)
    assert posted == sorted(job_ids)
    for job_id in job_ids:
        row = _delivery(session_factory, job_id)
        assert (row.state, row.attempts) == ("delivered", 1)


def _resolver(*addresses: str) -> Any:
    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [(0, 0, 0, "", (a, port)) for a in addresses]

    return resolve


def test_every_resolved_address_must_be_public() -> None:
    # DNS is the boundary here: a name may answer with several addresses, one of them private.
    for answer in (["10.0.0.5"], ["93.184.215.14", "10.0.0.5"], ["::ffff:127.0.0.1"]):
        with pytest.raises(WebhookTargetError, match="non-public address"):
            resolve_target(
                "https://hooks.example.com/x", allow_private=False, resolve=_resolver(*answer)
            )


def test_a_call_connects_to_the_checked_address_under_the_urls_name() -> None:
    target = resolve_target(
        "https://hooks.example.com:8443/in?a=1",
        allow_private=False,
        resolve=_resolver("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "93.184.215.14"),
    )
    assert target.url == "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443/in?a=1"
    assert target.host_header == "hooks.example.com:8443"
    assert target.sni_hostname == "hooks.example.com"


def test_signature_checks() -> None:
    body = b'{"event":"job.finished"}'
    header = signature_header(SECRET, body, timestamp=1_700_000_000)
    assert verify_signature(SECRET, header, body, now=1_700_000_100)
    assert not verify_signature(SECRET, header, body, now=1_700_000_400)  # replayed too late
    assert not verify_signature(SECRET, header, body + b" ", now=1_700_000_100)
    assert not verify_signature(SECRET, None, body)
    assert not verify_signature(SECRET, "v1=abc", body)
    assert not verify_signature(SECRET, "t=1700000000", body, now=1_700_000_000)
    rotated = f"{header},v1={'0' * 64}"
    assert verify_signature(SECRET.encode(), rotated, body, now=1_700_000_000)


def test_receivers_import_the_signature_check_without_the_service() -> None:
    loaded = top_level_modules_after("import mpq_service.webhook_signature")
    assert "mpq_service" in loaded
    assert not loaded & {"sqlalchemy", "pydantic", "httpx", "fastapi", "celery", "torch"}
