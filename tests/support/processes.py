"""Service processes for tests and benchmarks: started in their own process group with their
output in a log file, awaited until an HTTP health URL answers, stopped with their children.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.net import free_port

__all__ = [
    "ServiceNotReady",
    "ServiceProcess",
    "die_with_parent",
    "pid_alive",
    "start_http_service",
    "wait_pid_gone",
]


class ServiceNotReady(RuntimeError):
    """A service exited or did not answer its health URL in time; the message holds its log."""


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited child not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_pid_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` is gone; False if it is still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class ServiceProcess:
    """A subprocess in its own process group, its output appended to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, command: list[str], *, env: dict[str, str], cwd: Path, log_path: Path
    ) -> ServiceProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return f"--- {self.name} ({state}), log tail:\n{self.tail()}"

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Poll ``url`` until it answers 200; raise :class:`ServiceNotReady` with the log if
        the process exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while self.alive() and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"{response.status_code}: {response.text[:200]}"
            time.sleep(0.1)
        why = "exited" if not self.alive() else f"not ready after {timeout_s:.0f} s"
        raise ServiceNotReady(f"{self.name} {why} (GET {url}: {last})\n{self.describe()}")

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the main process (a graceful shutdown), then SIGKILL whatever is left of
        its group (prefork children, a hung main process). Returns the main exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_s)
        return self.popen.returncode


def start_http_service(
    name: str,
    command_for_port: Callable[[int], list[str]],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    ready_path: str = "/readyz",
    timeout_s: float = 60.0,
    attempts: int = 3,
) -> tuple[ServiceProcess, str]:
    """Start an HTTP server on a free port and wait until ``ready_path`` answers 200.

    A server that exits before it is ready is retried on a fresh port (another process may
    have taken the port between the check and the bind); one that hangs is not.

    Returns:
        The running process and its base URL (``http://127.0.0.1:PORT``).
    """
    deadline = time.monotonic() + timeout_s
    for attempt in range(attempts):
        port = free_port()
        proc = ServiceProcess.start(
            name, command_for_port(port), env=env, cwd=cwd, log_path=log_path
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_ready(base_url + ready_path, max(1.0, deadline - time.monotonic()))
        except ServiceNotReady:
            exited = not proc.alive()
            proc.stop()
            if exited and attempt < attempts - 1 and time.monotonic() < deadline:
                continue
            raise
        return proc, base_url
    raise AssertionError("unreachable")


def start_celery_worker(
    name: str, env: dict[str, str], cwd: Path, log_path: Path, *, node: str | None = None
) -> ServiceProcess:
    """A real Celery worker as production runs it (prefork, one child, the mpq queue), with a
    unique node name so several can share a broker."""
    from mpq_service.celery_config import DEFAULT_QUEUE

    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "--concurrency", "1", "-Q", DEFAULT_QUEUE,
        "-n", f"{node or name}-{secrets.token_hex(4)}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return ServiceProcess.start(name, command, env=env, cwd=cwd, log_path=log_path)
