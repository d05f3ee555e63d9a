"""A real ``mpq serve`` (``--no-worker`` unless asked) for the pressure, outage and operations
tests, raw-socket clients that behave badly (stall mid-body, vanish mid-body), and the check that
the served process logged no unhandled error."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.auth import create_key
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from tests.support.processes import ServiceProcess, pid_alive, start_http_service

MPQ = Path(sys.executable).parent / "mpq"
PEPPER = "served-pepper"
READY_TIMEOUT_S = 60.0
# What the served process must never write: an unhandled error, with or without its traceback.
LOG_ALARMS = ("Traceback", "Exception in ASGI application", "unhandled error", "internal_error")


@dataclass
class Served:
    """A running ``mpq serve`` and an API key of tenant ``acme`` for it."""

    proc: ServiceProcess
    base_url: str
    key: str
    data_dir: Path

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until ``text`` appears ``count`` times in the log (a liveness bound only)."""
        deadline = time.monotonic() + timeout_s
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, (
                f"{text!r} logged {self.log().count(text)} of {count} times\n{self.proc.tail(80)}"
            )
            time.sleep(0.1)

    def stop_and_check_log(self) -> str:
        """Stop the process gracefully (in-flight requests finish first) and assert that its
        whole log holds no unhandled error; the log."""
        self.proc.stop()
        text = self.log()
        alarms = [a for a in LOG_ALARMS if a in text]
        assert not alarms, f"the served process logged {alarms}:\n{text[-6000:]}"
        return text


def serve_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of the served process: nothing inherited from MPQ_*, then ``settings``
    (``database_url="..."`` becomes ``MPQ_DATABASE_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env.update(MPQ_DATA_DIR=str(data_dir), MPQ_API_KEY_PEPPER=PEPPER, PYTHONUNBUFFERED="1")
    env.update({f"MPQ_{k.upper()}": v for k, v in settings.items()})
    return env


def make_key(database_url: str) -> str:
    """A fresh API key of tenant ``acme``, made directly in the (migrated) database."""
    engine = make_engine(database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            return create_key(session, "acme", "test", pepper=PEPPER)
    finally:
        engine.dispose()


@contextlib.contextmanager
def served(
    tmp_path: Path, *, key_database_url: str | None = None, worker: bool = False, **settings: str
) -> Iterator[Served]:
    """``mpq serve --no-worker`` (with ``worker``: ``mpq serve`` and its embedded worker, ready
    once ``/readyz`` says the worker runs) with ``settings`` (e.g. ``database_url=...``); the
    key is made through ``key_database_url`` (default: the served database) after migrating it."""
    data_dir = tmp_path / "data"
    database_url = settings.get("database_url") or f"sqlite:///{data_dir / 'mpq.db'}"
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(key_database_url or database_url)
    key = make_key(key_database_url or database_url)
    flags = [] if worker else ["--no-worker"]
    proc, base_url = start_http_service(
        "mpq serve",
        lambda port: [str(MPQ), "serve", *flags, "--port", str(port)],
        env=serve_env(data_dir, **settings),
        cwd=tmp_path,
        log_path=tmp_path / "serve.log",
        ready_path="/readyz" if worker else "/healthz",
        timeout_s=READY_TIMEOUT_S,
    )
    try:
        yield Served(proc, base_url, key, data_dir)
    finally:
        proc.stop()
        _kill_embedded_worker(proc)


def _kill_embedded_worker(proc: ServiceProcess) -> None:
    """SIGKILL the embedded worker if it outlived ``mpq serve`` (it runs in its own session,
    out of reach of the process-group kill of :meth:`ServiceProcess.stop`)."""
    match = re.search(r"worker started \(pid (\d+)", proc.tail(10_000))
    if match and pid_alive(int(match.group(1))):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(match.group(1)), signal.SIGKILL)


def stored_objects(data_dir: Path) -> list[Path]:
    """Every object file of local storage under ``data_dir``, temporary files included."""
    root = data_dir / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def open_upload(
    served_api: Served,
    path: str,
    length: int,
    *,
    content_type: str = "application/octet-stream",
    timeout_s: float = 30.0,
) -> socket.socket:
    """Start ``POST path`` with ``Content-Length: length`` and ``Expect: 100-continue``, and
    return the socket once the server said ``100 Continue``: the server sends it when the route
    starts reading the body, so the request has been authenticated by then. Nothing of the
    body is sent yet."""
    sock = socket.create_connection(("127.0.0.1", served_api.port), timeout=timeout_s)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {served_api.key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    reply = sock.recv(4096)
    if not reply.startswith(b"HTTP/1.1 100"):
        sock.close()
        raise AssertionError(f"expected '100 Continue' once authenticated, got {reply[:300]!r}")
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the rest of the response (read to EOF or the end of its body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(head.split(b" ", 2)[1]), body
