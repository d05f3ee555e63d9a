"""The web pages through TestClient on a real app (migrated SQLite, local storage): the session
cookie, CSRF, tenancy (a foreign id is the same 404 page as a missing one), the submit form's
validation and storage, deleting uploads, and the job page's allocation chart. The browser flow
against a real ``mpq serve`` is tests/ui/test_pages_browser.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import revoke_key
from api.pages.session import COOKIE
from mpq_service.db import session_scope
from mpq_service.job_status import JobStatus
from mpq_service.storage_keys import artifact_key
from mpq_service.tables import Artifact, Dataset, Job, ModelFile
from tests.api.apptools import (
    PEPPER,
    SPEC,
    Service,
    data_bytes,
    model_bytes,
    running_service,
    upload,
)

SPEC_FIELDS = {"budgets": "avg-bits=4", "bits": "2, 4, 8", "finetune_epochs": "0",
               "act_bits": "8", "granularity": "channel", "method": "fisher"}  # fmt: skip


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path) as service:
        yield service


def _sign_in(svc: Service, tenant: str) -> str:
    """Sign the client in as ``tenant`` through the form; the key."""
    key = svc.key(tenant)["Authorization"].split()[1]
    svc.client.cookies.clear()
    r = svc.client.post("/ui/signin", data={"api_key": key}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return key


def _csrf(svc: Service, path: str = "/ui/jobs") -> str:
    r = svc.client.get(path)
    assert r.status_code == 200, r.text
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text)
    assert match, r.text[:500]
    return match.group(1)


def _form(csrf: str | None, **overrides: Any) -> list[tuple[str, Any]]:
    """The submit form's parts in the browser's order: token, text fields, then files."""
    fields = {**SPEC_FIELDS, "model_id": "", "dataset_id": "", "eval_dataset_id": ""}
    files = {"model": ("mlp.pt", model_bytes()), "data": ("calib.npz", data_bytes())}
    fields.update({k: v for k, v in overrides.items() if k not in files})
    files.update({k: v for k, v in overrides.items() if k in files})
    parts: list[tuple[str, Any]] = [] if csrf is None else [("csrf", (None, csrf))]
    parts += [(k, (None, v)) for k, v in fields.items() if v is not None]
    parts += [(k, v) for k, v in files.items() if v is not None]
    parts.append(("eval_data", ("", b"")))  # no file chosen
    return parts


def _submit(svc: Service, parts: list[tuple[str, Any]]) -> httpx.Response:
    return svc.client.post("/ui/jobs/new", files=parts, follow_redirects=False)


def _update_job(svc: Service, job_id: str, **values: Any) -> Job:
    """The job's row, after setting ``values`` on it."""
    with session_scope(svc.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)
    return job


def _job_id(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text[:2000]
    return r.headers["location"].rsplit("/", 1)[1]


def test_pages_without_a_session_go_to_sign_in_and_json_is_401(svc: Service) -> None:
    r = svc.client.get("/ui/jobs?status=failed", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/signin?next=%2Fui%2Fjobs%3Fstatus%3Dfailed"
    r = svc.client.get("/ui/jobs/live?ids=x")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    page = svc.client.get("/ui/signin")
    assert page.status_code == 200 and 'name="api_key"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_keys(svc: Service) -> None:
    r = svc.client.post("/ui/signin", data={"api_key": "mpq_nope"}, follow_redirects=False)
    assert r.status_code == 401 and "unknown or revoked API key" in r.text
    assert COOKIE not in r.headers.get("set-cookie", "")
    key = svc.key("acme")["Authorization"].split()[1]
    r = svc.client.post(
        "/ui/signin",
        data={"api_key": key, "next": "https://evil.example/ui/jobs"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"  # never off-site
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here
    secure = svc.client.post(
        "https://testserver/ui/signin", data={"api_key": key}, follow_redirects=False
    )
    assert "Secure" in secure.headers["set-cookie"]
    cross = svc.client.post(
        "/ui/signin", data={"api_key": key}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert cross.status_code == 403


def test_a_revoked_key_signs_the_browser_out(svc: Service) -> None:
    key = _sign_in(svc, "acme")
    assert svc.client.get("/ui/jobs").status_code == 200
    with session_scope(svc.sessions) as session:
        assert revoke_key(session, key, pepper=PEPPER)
    r = svc.client.get("/ui/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")


def test_posts_without_the_csrf_token_are_403_and_change_nothing(svc: Service) -> None:
    _sign_in(svc, "acme")
    csrf = _csrf(svc)
    for data in ({}, {"csrf": "0" * 64}):
        r = svc.client.post("/ui/signout", data=data, follow_redirects=False)
        assert r.status_code == 403 and "stale" in r.text
    assert _submit(svc, _form(None)).status_code == 403
    assert _submit(svc, _form("f" * 64)).status_code == 403
    assert svc.stored_files() == [] and svc.enqueued == []
    # The token of one session is no good for another.
    other = _sign_in(svc, "acme")
    assert other and svc.client.post("/ui/signout", data={"csrf": csrf}).status_code == 403
    r = svc.client.post("/ui/signout", data={"csrf": _csrf(svc)}, follow_redirects=False)
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]


def test_the_form_stores_the_files_and_queues_the_job(svc: Service) -> None:
    _sign_in(svc, "acme")
    page = svc.client.get("/ui/jobs/new")
    assert 'value="2, 3, 4, 5, 6, 8"' in page.text  # JobSpec's default bits
    job_id = _job_id(_submit(svc, _form(_csrf(svc))))
    assert svc.enqueued == [job_id]
    with session_scope(svc.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.QUEUED.value
        assert job.spec["budgets"] == ["avg-bits=4"] and job.spec["bits"] == [2, 4, 8]
        assert job.spec["finetune"]["epochs"] == 0 and job.eval_dataset_id is None
        assert job.spec["symmetric"] is False  # an unchecked box is off
        model_id = job.model_id
    assert len(svc.stored_files()) == 2
    # Reuse the uploaded model: a job on it, with only new data.
    reused = _job_id(_submit(svc, _form(_csrf(svc), model_id=model_id, model=None)))
    assert _update_job(svc, reused).model_id == model_id
    page = svc.client.get(f"/ui/jobs/new?model_id={model_id}")
    assert f'<option value="{model_id}" selected>' in page.text


def test_a_bad_spec_shows_the_apis_message_and_stores_nothing(svc: Service) -> None:
    _sign_in(svc, "acme")
    r = _submit(svc, _form(_csrf(svc), budgets="avg-bits=lots", bits="2, 4, 8"))
    assert r.status_code == 422
    assert "cannot read budget &#39;avg-bits=lots&#39;" in r.text  # the API's own message
    assert 'value="avg-bits=lots"' in r.text  # the form keeps what was typed
    r = _submit(svc, _form(_csrf(svc), finetune_epochs="-1"))
    assert r.status_code == 422 and "finetune.epochs" in r.text
    r = _submit(svc, _form(_csrf(svc), model=None))
    assert r.status_code == 422 and "choose or upload a model" in r.text
    assert svc.stored_files() == [] and svc.enqueued == []


def test_the_form_takes_pins_ties_and_a_webhook(svc: Service) -> None:
    _sign_in(svc, "acme")
    pins = "0\\.weight=8\n\n  2\\.weight = 4  \n"
    form = _form(
        _csrf(svc), pins=pins, ties="0\\..*\n2\\..*", webhook_url="https://example.com/hook"
    )
    job_id = _job_id(_submit(svc, form))
    job = _update_job(svc, job_id)
    assert job.spec["pins"] == {"0\\.weight": 8, "2\\.weight": 4}
    assert job.spec["ties"] == ["0\\..*", "2\\..*"]
    assert job.webhook_url == "https://example.com/hook"

    # Each refused the way the API refuses it, with nothing stored.
    files = svc.stored_files()
    for field, value, shown in (
        ("pins", "0\\.weight", "REGEX=BITS"),
        ("pins", "0\\.weight=7", "7"),
        ("ties", "(unclosed", "tie"),
        ("webhook_url", "http://127.0.0.1/hook", "webhook_url"),
    ):
        r = _submit(svc, _form(_csrf(svc), **{field: value}))
        assert r.status_code == 422 and shown in r.text, (field, value, r.text[:3000])
    assert svc.stored_files() == files and svc.enqueued == [job_id]


def _finished_job(svc: Service, headers: dict[str, str], with_allocation: bool) -> str:
    """A job of the key's tenant marked succeeded with a result and artefacts."""
    model = svc.client.post("/v1/models", content=model_bytes(), headers=headers).json()
    data = svc.client.post("/v1/datasets", content=data_bytes(), headers=headers).json()
    spec = {"budgets": ["avg-bits=4"], "bits": [2, 4, 8]}
    r = svc.client.post(
        "/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "spec": spec},
        headers=headers,
    )  # fmt: skip
    job_id: str = r.json()["id"]
    layers = [{"name": f"l{i}", "bits": b, "params": 10 * (i + 1)} for i, b in enumerate([8, 4])]
    files = {"model.pt": b"quantized"}
    if with_allocation:
        files["allocation.json"] = json.dumps({"layers": layers}).encode()
    with session_scope(svc.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, body in files.items():
            key = artifact_key(job.tenant_id, job.id, name)
            svc.storage.put_bytes(key, body)
            session.add(Artifact(job_id=job.id, tenant_id=job.tenant_id, name=name,
                                 size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                                 storage_key=key))  # fmt: skip
        job.status = JobStatus.SUCCEEDED.value
        job.progress = 1.0
        job.result = {
            "allocation": {"l0": 8, "l1": 4},
            "metrics": {"float": {"accuracy": 0.9}, "quantized": {"accuracy": 0.85}},
            "sizes": {"predicted_bytes": 2048, "packed_checkpoint_bytes": 3072},
        }
    return job_id


@pytest.mark.parametrize("with_allocation", [True, False])
def test_the_job_page_draws_one_bar_per_layer(svc: Service, with_allocation: bool) -> None:
    job_id = _finished_job(svc, svc.key("acme"), with_allocation)
    _sign_in(svc, "acme")
    page = svc.client.get(f"/ui/jobs/{job_id}").text
    assert page.count('<g class="bar"') == 2
    assert ("10 params" in page) is with_allocation  # counts come from allocation.json
    assert '<rect x="220" y="0" width="360.0"' in page  # 8 bits: the whole axis
    assert '<rect x="220" y="0" width="180.0"' in page
    listed = svc.client.get("/ui/jobs").text
    assert "3.0 KiB" in listed and "90.0 % → 85.0 %" in listed
    r = svc.client.get(f"/ui/jobs/{job_id}/artifacts/model.pt")
    assert r.status_code == 200 and r.content == b"quantized"


def test_another_tenants_ids_are_404_pages_and_lists_are_empty(svc: Service) -> None:
    job_id = _finished_job(svc, svc.key("acme"), True)
    job = _update_job(svc, job_id)
    model_id, dataset_id = job.model_id, job.dataset_id
    _sign_in(svc, "globex")
    for url in (f"/ui/jobs/{job_id}", f"/ui/jobs/{job_id}/artifacts/model.pt",
                "/ui/jobs/no-such-job"):  # fmt: skip
        r = svc.client.get(url)
        assert r.status_code == 404 and "<h1>Not found</h1>" in r.text, url
    assert svc.client.get(f"/ui/jobs/{job_id}/state").status_code == 404
    assert svc.client.get(f"/ui/jobs/live?ids={job_id}").json() == {"items": []}
    for path in ("jobs", "models", "datasets"):
        text = svc.client.get(f"/ui/{path}").text
        assert job_id not in text and model_id not in text and dataset_id not in text, path
    csrf = _csrf(svc)
    for url in (f"/ui/models/{model_id}/delete", f"/ui/datasets/{dataset_id}/delete",
                f"/ui/jobs/{job_id}/delete", f"/ui/jobs/{job_id}/cancel"):  # fmt: skip
        assert svc.client.post(url, data={"csrf": csrf}).status_code == 404, url
    r = _submit(svc, _form(csrf, model_id=model_id, model=None))
    assert r.status_code == 404
    with session_scope(svc.sessions) as session:
        assert session.get(ModelFile, model_id) is not None
        assert session.get(Job, job_id) is not None
        assert session.query(Dataset).count() == 1  # the form's data file was not kept


def test_deleting_an_upload_in_use_is_a_409_page(svc: Service) -> None:
    _sign_in(svc, "acme")
    job_id = _job_id(_submit(svc, _form(_csrf(svc))))
    model_id = _update_job(svc, job_id).model_id
    r = svc.client.post(f"/ui/models/{model_id}/delete", data={"csrf": _csrf(svc)})
    assert r.status_code == 409 and "used by queued or running job" in r.text
    r = svc.client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": _csrf(svc)})
    assert r.status_code == 200 and "cancelled" in r.text
    r = svc.client.post(f"/ui/models/{model_id}/delete", data={"csrf": _csrf(svc)})
    assert r.status_code == 200 and model_id not in svc.client.get("/ui/models").text


def test_names_are_escaped(svc: Service) -> None:
    _sign_in(svc, "acme")
    name = "<img src=x onerror=alert(1)>.pt"
    job_id = _job_id(_submit(svc, _form(_csrf(svc), model=(name, model_bytes()))))
    for url in ("/ui/models", f"/ui/jobs/{job_id}", "/ui/jobs"):
        text = svc.client.get(url).text
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text, url


def test_a_failed_job_shows_its_error_at_its_stage(svc: Service) -> None:
    _sign_in(svc, "acme")
    job_id = _job_id(_submit(svc, _form(_csrf(svc))))
    _update_job(
        svc, job_id, status=JobStatus.FAILED.value, stage="allocate",
        error_code="budget_infeasible", error_message="size=100B cannot be met",
    )  # fmt: skip
    page = svc.client.get(f"/ui/jobs/{job_id}").text
    assert "budget_infeasible</strong>: size=100B cannot be met" in page
    assert '<li class="stage-done" data-stage="analyze">' in page
    assert '<li class="stage-failed" data-stage="allocate">' in page
    assert '<li class="stage-pending" data-stage="quantize">' in page
    state = svc.client.get(f"/ui/jobs/{job_id}/state").json()
    assert state["final"] and state["error"] == "size=100B cannot be met"


def test_the_history_filters_by_status_and_model_and_pages_by_twenty(svc: Service) -> None:
    headers = svc.key("acme")
    model_ids = [upload(svc, headers, "models", model_bytes(), f"m{i}.pt")["id"] for i in (0, 1)]
    dataset_id = upload(svc, headers, "datasets", data_bytes(), "d.npz")["id"]
    jobs = []
    for i in range(22):
        body = {"model_id": model_ids[i == 0], "dataset_id": dataset_id, "spec": SPEC}
        jobs.append(svc.client.post("/v1/jobs", json=body, headers=headers).json()["id"])
    svc.client.post(f"/v1/jobs/{jobs[1]}/cancel", headers=headers)
    _sign_in(svc, "acme")

    def rows(url: str) -> list[str]:
        return re.findall(r'<tr data-job-id="([^"]+)"', svc.client.get(url).text)

    first = svc.client.get("/ui/jobs").text
    assert rows("/ui/jobs") == jobs[::-1][:20]  # newest first
    older = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert older, "no link to the older jobs"
    assert rows(older.group(1).replace("&amp;", "&")) == [jobs[1], jobs[0]]
    assert rows("/ui/jobs?status=cancelled") == [jobs[1]]
    assert rows(f"/ui/jobs?model={model_ids[1]}") == [jobs[0]]
    assert rows(f"/ui/jobs?model={model_ids[1]}&status=queued") == [jobs[0]]
    assert svc.client.get("/ui/jobs?status=bogus").status_code == 422
