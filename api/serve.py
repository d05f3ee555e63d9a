"""``mpq serve``: the embedded service in one command, with no server to install.

It migrates the database (SQLite under ``MPQ_DATA_DIR`` by default), starts one Celery worker
as a subprocess (solo pool, one job at a time, the same environment, on the filesystem broker
under ``MPQ_DATA_DIR/broker`` by default), and serves the API with uvicorn in the foreground.
When uvicorn stops (Ctrl-C, SIGINT, SIGTERM or an error), the worker is stopped: SIGTERM (a warm
shutdown), then SIGKILL if it has not exited after ``worker_stop_timeout_s``. A job the worker
was running is then re-queued by the broker (``acks_late``) and its attempt counted.

This process never imports torch (so never initializes CUDA): the API does not need it and the
worker is a separate process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from mpq_service.db import normalize_url
from mpq_service.settings import Settings

__all__ = ["WORKER_STOP_TIMEOUT_S", "serve", "start_worker", "stop_worker", "worker_command"]

log = logging.getLogger("mpq.serve")

WORKER_STOP_TIMEOUT_S = 10.0
# Longer than clients keep idle connections (httpx 5 s, load balancers 60 s): a server that closes
# an idle keep-alive connection first races the client's next request on it, which then fails
# with a connection reset (bench_load saw it when starved CPUs delayed that request past 5 s).
KEEP_ALIVE_S = 75


class _Stop(BaseException):
    """Raised by the SIGTERM handler outside uvicorn's own signal handling."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def worker_command() -> list[str]:
    """The command line of the embedded worker: solo pool, one job at a time."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def _worker_env(settings: Settings) -> dict[str, str]:
    # The same environment, with the derived settings spelled out so the worker cannot read
    # them differently (e.g. after a default changes).
    env = dict(os.environ)
    env["MPQ_DATA_DIR"] = str(settings.data_dir)
    env["MPQ_DATABASE_URL"] = normalize_url(settings.database_url).render_as_string(
        hide_password=False
    )
    env["MPQ_BROKER_URL"] = settings.broker_url
    env["MPQ_STORAGE"] = settings.storage
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the worker gets SIGTERM if this process dies without stopping it (e.g. SIGKILL).
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """Start the embedded Celery worker; its output goes to this process's stdout/stderr.

    It runs in its own session, so a Ctrl-C in the terminal reaches only this process, which
    then stops the worker in order.
    """
    preexec: Callable[[], None] | None = _die_with_parent if sys.platform == "linux" else None
    return subprocess.Popen(
        worker_command(),
        env=_worker_env(settings),
        start_new_session=True,
        preexec_fn=preexec,  # no threads exist yet in this process
    )


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int:
    """Stop the worker: SIGTERM (warm shutdown), then SIGKILL after ``timeout_s``; its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    log.info("stopping the worker (pid %d)", proc.pid)
    proc.terminate()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("the worker did not stop within %.0f s; killing it", timeout_s)
        proc.kill()
        return proc.wait()


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker: bool = True,
    log_level: str = "info",
    worker_stop_timeout_s: float = WORKER_STOP_TIMEOUT_S,
) -> int:
    """Run the embedded service in the foreground until interrupted; returns the exit code.

    Example:
        >>> serve(get_settings(), port=8000)  # doctest: +SKIP
    """
    import uvicorn

    from api.app import create_app
    from mpq_service.migrate import upgrade

    # SIGTERM before or after uvicorn's own handling (uvicorn re-raises it once it has shut down)
    # unwinds through the finally below, which stops the worker.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    proc: subprocess.Popen[bytes] | None = None
    try:
        data_dir = Path(settings.data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        database = normalize_url(settings.database_url).render_as_string(hide_password=True)
        log.info("data directory: %s", data_dir)
        log.info("database: %s", database)
        if settings.storage == "local":
            log.info("storage: local files under %s", data_dir)
        else:
            log.info("storage: s3 bucket %s at %s", settings.s3_bucket, settings.s3_endpoint_url)
        broker = settings.broker_url
        if broker.startswith("filesystem:"):
            broker = f"filesystem broker under {Path(settings.broker_dir).resolve()}"
        log.info("broker: %s", broker)
        upgrade(settings.database_url)
        log.info("database migrated to the latest schema")
        app = create_app(settings)
        if worker:
            proc = start_worker(settings)
            log.info("worker started (pid %d, solo pool, one job at a time)", proc.pid)
        else:
            log.info("no worker started (--no-worker): run workers yourself")
        log.info("API at http://%s:%d (docs at /docs); Ctrl-C stops it", host, port)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            workers=1,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        uvicorn.Server(config).run()
        return 0
    except _Stop as stop:
        log.info("received %s, shutting down", signal.Signals(stop.signum).name)
        return 0
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
        return 0
    finally:
        if proc is not None:
            code = stop_worker(proc, worker_stop_timeout_s)
            log.info("worker stopped (exit code %s)", code)
        signal.signal(signal.SIGTERM, previous)
