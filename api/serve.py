"""``mpq serve``: the embedded service in one command, with no server to install.

It migrates the database (SQLite under ``MPQ_DATA_DIR`` by default), starts one Celery worker
as a subprocess (solo pool, one job at a time, the same environment, on the filesystem broker
under ``MPQ_DATA_DIR/broker`` by default), and serves the API with uvicorn in the foreground.

The worker is kept by a :class:`WorkerSupervisor` thread:

- Before it starts the worker it recovers what the last run left
  (:func:`mpq_service.reaper.recover_on_start`): the filesystem broker deletes a message when a
  worker reads it, so the job table is the source of truth; jobs left ``running`` by a worker
  that was killed or stopped are re-queued (their attempt counted; failed with
  ``worker_lost_repeatedly`` at the cap), and every ``queued`` job gets a message again.
- A worker that exits on its own (crash, out of memory, killed) is restarted the same way, after
  a delay that grows with quick successive deaths (1 s up to 30 s).
- ``/readyz`` answers 503 while no worker is running (``app.state.readiness_probes["worker"]``).

When uvicorn stops (Ctrl-C, SIGINT, SIGTERM or an error), the worker is stopped: SIGTERM (a warm
shutdown), then SIGKILL if it has not exited after ``worker_stop_timeout_s`` (the setting
``MPQ_WORKER_STOP_TIMEOUT_S``, 10 s by default); a job it was
running is re-queued at the next start. If this process is killed outright, the worker gets
SIGTERM from the kernel (``MPQ_WORKER_PARENT_PID``, see :mod:`worker.lifecycle`), finishes its
job and exits; the next start leaves a job alone while its heartbeat is live.

Each worker also runs a reaper thread (heartbeats, stale jobs, the time-limit backstop: the solo
pool has no Celery time limits), see :mod:`mpq_service.reaper`.

Logs go to stderr in the format ``MPQ_LOG_FORMAT`` picks (:mod:`mpq_service.logs`), the
worker's too (it is given the same format), with one access line per request.

This process never imports torch (so never initializes CUDA): the API does not need it and the
worker is a separate process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from mpq_service.db import normalize_url
from mpq_service.logs import resolve_format, setup_logging
from mpq_service.settings import Settings

__all__ = [
    "WORKER_STOP_TIMEOUT_S",
    "WorkerSupervisor",
    "serve",
    "start_worker",
    "stop_worker",
    "worker_command",
]

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
    env["MPQ_LOG_FORMAT"] = resolve_format(settings.log_format)  # as this process's lines
    return env


#: The worker reads it (worker.lifecycle) and asks the kernel for SIGTERM when we die.
_PARENT_PID_ENV = "MPQ_WORKER_PARENT_PID"
#: Delays before restarting a worker that died, growing with quick successive deaths.
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
#: A worker that lived this long resets the restart delay.
_HEALTHY_AFTER_S = 60.0


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """Start the embedded Celery worker; its output goes to this process's stdout/stderr.

    It runs in its own session, so a Ctrl-C in the terminal reaches only this process, which
    then stops the worker in order. No ``preexec_fn``: this may run in a thread.
    """
    env = _worker_env(settings)
    env[_PARENT_PID_ENV] = str(os.getpid())
    return subprocess.Popen(worker_command(), env=env, start_new_session=True)


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


class WorkerSupervisor:
    """Runs the embedded worker from a thread: recover, start, watch, restart; see the module
    docstring. :meth:`problem` is ``/readyz``'s worker probe.

    Example:
        >>> supervisor = WorkerSupervisor(settings).start()
        >>> supervisor.stop()
    """

    def __init__(self, settings: Settings, stop_timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        self.settings = settings
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_exit: int | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpq-worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def problem(self) -> str | None:
        """None while the worker runs; otherwise what is wrong, in a sentence."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            return None
        if self.last_exit is None:
            return "the worker is starting (re-queuing jobs left by the last run first)"
        return f"the worker exited with code {self.last_exit}; it is being restarted"

    def stop(self) -> int | None:
        """Stop watching and stop the worker (SIGTERM, then SIGKILL); its exit code."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        code = stop_worker(proc, self.stop_timeout_s) if proc is not None else None
        self._thread.join(timeout=self.stop_timeout_s + 5.0)
        return code

    def _run(self) -> None:
        deaths = 0
        while not self._stopping.is_set():
            self._recover()
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = start_worker(self.settings)
                self.starts += 1
            log.info("worker started (pid %d, solo pool, one job at a time)", self.proc.pid)
            started = time.monotonic()
            while self.proc.poll() is None and not self._stopping.wait(0.2):
                pass
            if self._stopping.is_set():
                return
            self.last_exit = self.proc.returncode
            deaths = 0 if time.monotonic() - started > _HEALTHY_AFTER_S else deaths + 1
            delay = RESTART_DELAYS_S[min(deaths, len(RESTART_DELAYS_S)) - 1] if deaths else 0.0
            log.error(
                "the worker (pid %d) exited with code %s; restarting it in %.0f s",
                self.proc.pid,
                self.last_exit,
                delay,
            )
            self._stopping.wait(delay)

    def _recover(self) -> None:
        """Re-queue what a previous worker left (see :func:`recover_on_start`)."""
        from api.queue import celery_enqueue
        from mpq_service.db import make_engine, make_sessionmaker
        from mpq_service.reaper import first_line, recover_on_start

        engine = make_engine(self.settings.database_url)
        try:
            done = recover_on_start(
                self.settings,
                make_sessionmaker(engine),
                celery_enqueue(self.settings),
                sleep=self._stopping.wait,
            )
        except Exception as exc:  # the worker's own reaper tries again later
            log.warning("could not re-queue jobs left by the last run: %s", first_line(exc))
            return
        finally:
            engine.dispose()
        if done.requeued:
            log.info("re-queued %d job(s) left running by a stopped worker", len(done.requeued))
        if done.failed:
            log.warning("%d job(s) failed: their worker was lost too often", len(done.failed))


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    worker: bool = True,
    log_level: str = "info",
    worker_stop_timeout_s: float | None = None,
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
    supervisor: WorkerSupervisor | None = None
    setup_logging(settings.log_format)  # uvicorn's lines too: it gets no log config of its own
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
            stop_s = worker_stop_timeout_s
            if stop_s is None:
                stop_s = settings.worker_stop_timeout_s
            supervisor = WorkerSupervisor(settings, stop_s).start()
            app.state.readiness_probes["worker"] = supervisor.problem
        else:
            log.info("no worker started (--no-worker): run workers yourself")
        log.info("API at http://%s:%d (docs at /docs); Ctrl-C stops it", host, port)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            log_config=None,
            access_log=False,  # api.metrics logs each request, with its route and request id
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
        if supervisor is not None:
            code = supervisor.stop()
            log.info("worker stopped (exit code %s)", code)
        signal.signal(signal.SIGTERM, previous)
