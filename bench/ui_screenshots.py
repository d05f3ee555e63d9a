"""Screenshots of the web pages for the README: ``python -m bench.ui_screenshots``.

Starts ``mpq serve`` (API and worker) in a temporary directory, signs in to ``/ui/`` in Debian's
headless chromium (Playwright), submits the digits CNN of :mod:`bench.digits` through the form
(average 3 bits, a trade-off curve, its test split as evaluation data), submits a second job
whose budget cannot be met through the JSON API (so the history shows a failure too), waits for
both, and saves ``bench/results/ui_jobs.png``, ``ui_job.png`` and ``ui_submit.png``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.digits import WORK, prepare
from tests.support.jobs import wait_for_job
from tests.support.ui import chromium, serve_with_worker, sign_in, submit_job_form

RESULTS = Path(__file__).resolve().parent / "results"
JOB_TIMEOUT_S = 600.0
VIEWPORT = {"width": 1280, "height": 800}


def _infeasible_job(api: object, model_id: str, dataset_id: str) -> str:
    """A job whose size budget is below what any allocation reaches: it fails."""
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"budgets": ["size=100B"]}}
    response = api.post("/v1/jobs", json=body)  # type: ignore[attr-defined]
    response.raise_for_status()
    return str(response.json()["id"])


def main() -> int:
    from playwright.sync_api import sync_playwright

    prepared = prepare("cnn")
    calib, test = WORK / "digits_cnn_calib.npz", WORK / "digits_cnn_test.npz"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, serve_with_worker(Path(tmp)) as ui:
        key = ui.key("demo")
        with sync_playwright() as p:
            browser = chromium(p)
            page = browser.new_page(viewport=VIEWPORT)
            sign_in(page, ui.base_url, key)
            job_id = submit_job_form(
                page, ui.base_url, prepared.model_path, calib,
                budgets="avg-bits=3", epochs="3", sweep="avg-bits=2:8:1", eval_data=test,
            )  # fmt: skip
            with ui.api(key) as api:
                job = wait_for_job(api, job_id, timeout_s=JOB_TIMEOUT_S)
                if job["status"] != "succeeded":
                    print(f"the job {job['status']}: {job['error']}", file=sys.stderr)
                    return 1
                failed = _infeasible_job(api, job["model_id"], job["dataset_id"])
                wait_for_job(api, failed, timeout_s=JOB_TIMEOUT_S)
            shots = {"jobs": "/ui/jobs", "job": f"/ui/jobs/{job_id}", "submit": "/ui/jobs/new"}
            for name, path in shots.items():
                page.goto(ui.base_url + path)
                page.wait_for_load_state("networkidle")
                target = RESULTS / f"ui_{name}.png"
                page.screenshot(path=str(target), full_page=True)
                print(f"wrote {target}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
