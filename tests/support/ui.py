"""The web pages driven in a real browser: ``mpq serve`` with its worker (SQLite and files under
a temporary directory), API keys made in its database, Debian's headless chromium launched by
Playwright, and the steps a user takes (sign in, submit the job form). Used by tests/ui and by
``bench/ui_screenshots.py``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from api.auth import create_key
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from tests.api.served import PEPPER, serve_env
from tests.support.processes import ServiceProcess, pid_alive, start_http_service

__all__ = [
    "CHROMIUM",
    "UiService",
    "chromium",
    "serve_with_worker",
    "sign_in",
    "submit_job_form",
]

CHROMIUM = os.environ.get("MPQ_TEST_CHROMIUM", "/usr/bin/chromium")
MPQ = Path(sys.executable).parent / "mpq"
READY_TIMEOUT_S = 60.0
# The jobs' sandbox (MPQ_SANDBOX). A git worktree whose venv has another checkout installed
# editable needs "process": the namespace sandbox shows the child only this checkout's code.
SANDBOX = os.environ.get("MPQ_TEST_SANDBOX", "auto")
# Playwright never downloads a browser: it drives the system's chromium.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"]


@dataclass
class UiService:
    """A running ``mpq serve`` (API and worker) and its data directory."""

    proc: ServiceProcess
    base_url: str
    data_dir: Path

    def key(self, tenant: str) -> str:
        """A fresh API key of ``tenant`` (created if new), made in the service's database."""
        engine = make_engine(f"sqlite:///{self.data_dir / 'mpq.db'}")
        try:
            with session_scope(make_sessionmaker(engine)) as session:
                return create_key(session, tenant, "ui", pepper=PEPPER)
        finally:
            engine.dispose()

    def api(self, key: str) -> httpx.Client:
        """A client of the JSON API with ``key`` as its bearer token."""
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    def worker_pid(self) -> int:
        match = re.search(r"worker started \(pid (\d+)", self.proc.tail(10_000))
        assert match, f"no worker started:\n{self.proc.describe()}"
        return int(match.group(1))

    @contextlib.contextmanager
    def worker_paused(self) -> Iterator[None]:
        """The worker stopped (SIGSTOP) inside the block: queued jobs stay queued until it
        ends, so a page can be watched while its job changes (SIGCONT)."""
        pid = self.worker_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def serve_with_worker(tmp_path: Path) -> Iterator[UiService]:
    """``mpq serve`` on a free port with its worker, ready (``/readyz``); stopped afterwards,
    its worker too."""
    data_dir = tmp_path / "data"
    env = serve_env(data_dir, job_time_limit_s="600", sandbox=SANDBOX)
    env["OMP_NUM_THREADS"] = "2"  # tiny models: more threads only spin on a busy machine
    proc, base_url = start_http_service(
        "mpq serve",
        lambda port: [str(MPQ), "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        log_path=tmp_path / "serve.log",
        timeout_s=READY_TIMEOUT_S,
    )
    service = UiService(proc, base_url, data_dir)
    try:
        yield service
    finally:
        worker = re.search(r"worker started \(pid (\d+)", proc.tail(10_000))
        proc.stop()
        if worker and pid_alive(int(worker.group(1))):
            os.kill(int(worker.group(1)), signal.SIGKILL)


def chromium(playwright: Any) -> Any:
    """Debian's chromium, headless, launched by Playwright (which downloads no browser)."""
    if not Path(CHROMIUM).exists():
        raise AssertionError(
            f"{CHROMIUM} not found: `make install` installs Debian's chromium when run as root "
            "(apt-get install -y chromium); MPQ_TEST_CHROMIUM names another binary"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def sign_in(page: Any, base_url: str, key: str) -> None:
    """Sign ``page`` in with ``key`` through the sign-in form."""
    page.goto(f"{base_url}/ui/signin")
    page.fill("#api_key", key)
    page.click("form button[type=submit]")
    page.wait_for_url(f"{base_url}/ui/jobs")


def submit_job_form(
    page: Any,
    base_url: str,
    model: Path,
    data: Path,
    *,
    budgets: str,
    epochs: str,
    sweep: str = "",
    eval_data: Path | None = None,
) -> str:
    """Fill in and send the new-job form with ``model`` and ``data`` uploaded; the job's id
    (the form lands on the job's page)."""
    page.goto(f"{base_url}/ui/jobs/new")
    page.fill("#budgets", budgets)
    page.fill("#finetune_epochs", epochs)
    page.fill("#sweep", sweep)
    page.set_input_files("#model", str(model))
    page.set_input_files("#data", str(data))
    if eval_data is not None:
        page.set_input_files("#eval_data", str(eval_data))
    page.click("button.primary")
    page.wait_for_url(re.compile(r".*/ui/jobs/[0-9a-f-]{36}$"))
    return str(page.url.rsplit("/", 1)[1])
