"""The web pages in a real headless chromium (Playwright) against a real ``mpq serve`` and its
worker: sign in, submit a job through the form, watch it finish live in the history (no
reload), open its page, check the allocation chart, download an artefact, and check that a
second tenant sees none of it. ``MPQ_UI_SCREENSHOTS=DIR`` also saves screenshots there
(``bench/ui_screenshots.py`` makes the README's)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.apptools import data_bytes, model_bytes
from tests.support.jobs import wait_for_job
from tests.support.ui import UiService, chromium, serve_with_worker, sign_in, submit_job_form

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

JOB_TIMEOUT_MS = 240_000
FINAL = re.compile("succeeded|failed|cancelled")
LAYERS = 3  # tests.zoo.SmallMLP: three Linear layers
API_SPEC = {"budgets": ["avg-bits=4"], "finetune": {"epochs": 0}, "runtime_exports": False}


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiService]:
    with serve_with_worker(tmp_path_factory.mktemp("ui")) as service:
        yield service


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = chromium(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "mlp.pt", tmp_path / "calib.npz"
    model.write_bytes(model_bytes())
    data.write_bytes(data_bytes(48))
    return model, data


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(accept_downloads=True)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_sign_in_refuses_an_unknown_key_and_takes_a_good_one(ui: UiService, page: Any) -> None:
    page.goto(f"{ui.base_url}/ui/jobs")
    assert page.url.startswith(f"{ui.base_url}/ui/signin")  # no cookie: sent to sign in
    page.fill("#api_key", "mpq_not-a-key-at-all")
    page.click("form button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("unknown or revoked API key")
    sign_in(page, ui.base_url, ui.key("acme"))
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()


def _screenshot(page: Any, name: str) -> None:
    folder = os.environ.get("MPQ_UI_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"ui_{name}.png"), full_page=True)


def test_a_job_from_the_form_finishes_live_and_shows_its_results(
    ui: UiService, page: Any, files: tuple[Path, Path]
) -> None:
    key = ui.key("acme")
    sign_in(page, ui.base_url, key)
    with ui.worker_paused():
        job_id = submit_job_form(
            page, ui.base_url, *files, budgets="avg-bits=4", epochs="1", sweep="avg-bits=2:8:2"
        )
        expect(page.locator("#job [data-field=status]")).to_have_text("queued")
        page.goto(f"{ui.base_url}/ui/jobs")
        row = page.locator(f"tr[data-job-id='{job_id}']")
        expect(row.locator("[data-field=status]")).to_have_text("queued")
        page.evaluate("window.mpqNotReloaded = true")
    # The worker runs the job now; the row follows it without a reload.
    status = row.locator("[data-field=status]")
    expect(status).to_have_text(FINAL, timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.mpqNotReloaded") is True
    with ui.api(key) as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
    assert status.inner_text() == job["status"] == "succeeded", f"{job['error']}\n{ui.proc.tail()}"
    expect(row.locator("[data-field=size]")).not_to_have_text("—")
    _screenshot(page, "jobs")

    page.click(f"tr[data-job-id='{job_id}'] a")
    expect(page.locator("#job [data-field=status]")).to_have_text("succeeded")
    assert page.locator("svg.bits g.bar").count() == LAYERS
    assert "params" in (page.locator("svg.bits").text_content() or "")
    for plot in ("sensitivity.svg", "curve.svg"):
        img = page.locator(f"figure.plot img[src$='/{plot}']")
        expect(img).to_be_visible()
        assert img.evaluate("i => i.complete && i.naturalWidth > 0"), plot
    expect(page.locator("table.metrics")).to_contain_text("accuracy")
    _screenshot(page, "job")

    with page.expect_download() as info:
        page.click("a[download='model.pt']")
    downloaded = Path(info.value.path()).read_bytes()
    with ui.api(key) as api:
        assert downloaded == api.get(f"/v1/jobs/{job_id}/artifacts/model.pt").content

    page.goto(f"{ui.base_url}/ui/jobs/new")
    _screenshot(page, "submit")


def test_a_second_tenant_sees_none_of_the_first_ones_data(ui: UiService, page: Any) -> None:
    key = ui.key("acme")
    with ui.api(key) as api:
        # One multipart request: the model, the data and the spec.
        parts = {
            "model": ("m.pt", model_bytes()),
            "data": ("d.npz", data_bytes(48)),
            "spec": (None, json.dumps(API_SPEC)),
        }
        created = api.post("/v1/jobs", files=parts)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job = wait_for_job(api, job_id, timeout_s=JOB_TIMEOUT_MS / 1000, describe=ui.proc.describe)
        assert job["status"] == "succeeded", job["error"]

    sign_in(page, ui.base_url, ui.key("globex"))
    expect(page.locator("p.empty")).to_contain_text("No jobs")
    assert page.locator("tr[data-job-id]").count() == 0
    for path in ("models", "datasets"):
        page.goto(f"{ui.base_url}/ui/{path}")
        assert page.locator("tr[data-id]").count() == 0, path
    for url in (f"/ui/jobs/{job_id}", f"/ui/jobs/{job_id}/artifacts/model.pt"):
        response = page.goto(ui.base_url + url)
        assert response is not None and response.status == 404, url
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert page.request.get(f"{ui.base_url}/ui/jobs/{job_id}/state").status == 404


def test_sign_out_needs_the_csrf_token_and_ends_the_session(ui: UiService, page: Any) -> None:
    sign_in(page, ui.base_url, ui.key("acme"))
    forged = page.request.post(f"{ui.base_url}/ui/signout", form={"csrf": "forged"})
    assert forged.status == 403
    missing = page.request.post(f"{ui.base_url}/ui/signout")
    assert missing.status == 403
    page.goto(f"{ui.base_url}/ui/jobs")  # still signed in
    page.click("form.signout button")
    page.wait_for_url(f"{ui.base_url}/ui/signin")
    page.goto(f"{ui.base_url}/ui/jobs")
    assert page.url.startswith(f"{ui.base_url}/ui/signin")
