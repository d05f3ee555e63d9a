"""Run an untrusted job in an isolated child process: :func:`run_sandboxed`.

The worker process holds the service's credentials (database URL, storage keys, API-key
pepper). An uploaded model is code, so it is loaded and run only in a child that has none of
them. The parent puts the job's files in a folder::

    JOB_DIR/input/   read-only for the child: model, data, job.json, cached table
    JOB_DIR/out/     the child's only writable folder

starts the child with :mod:`worker.sandbox_init` and follows it: progress lines from its
standard output, a periodic ``tick`` (which checks for cancellation and may raise), and a
wall-clock deadline. Whatever happens, the child's whole process tree is killed before
:func:`run_sandboxed` returns.

Isolation levels (:class:`Isolation`), picked by :func:`choose_isolation` from the ``sandbox``
setting:

- ``namespaces`` (Linux with user namespaces, the default wherever ``unshare`` works): a new
  user, mount, network, PID, IPC and UTS namespace; a root file system holding only the system
  libraries, Python, ``mpq_core`` and the job folder; no network interface; no capabilities;
  ``no_new_privs``; a seccomp filter; memory (``RLIMIT_DATA``), CPU-time, file-size and
  open-file limits; a clean environment.
- ``process`` (no user namespaces, e.g. a container started without permission for them): the
  same limits, seccomp filter (which refuses network sockets) and clean environment, but the
  host's files stay readable by the job's user. ``MPQ_SANDBOX=required`` refuses to run jobs
  at this level instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "Isolation",
    "SandboxLimits",
    "SandboxOutcome",
    "SandboxUnavailable",
    "available_isolation",
    "choose_isolation",
    "clean_environment",
    "run_sandboxed",
]

log = logging.getLogger(__name__)

_UNSHARE_FLAGS = (
    "--user", "--map-root-user", "--mount", "--net", "--pid", "--ipc", "--uts",
    "--fork", "--kill-child=SIGKILL",
)  # fmt: skip
_LINE_MAX = 64 * 1024
_STDERR_TAIL = 64 * 1024
#: Exit status of :mod:`worker.sandbox_init` when it could not build the sandbox.
SETUP_FAILED = 125


class Isolation(StrEnum):
    NAMESPACES = "namespaces"
    PROCESS = "process"


class SandboxUnavailable(Exception):
    """``MPQ_SANDBOX=required`` and this host cannot create the namespaces."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one child. ``None`` leaves a limit off."""

    wall_seconds: float
    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    file_bytes: int | None = None
    tmp_bytes: int = 256 * 1024**2


@dataclass
class SandboxOutcome:
    """How the child ended. ``stopped``: ``"deadline"`` when the wall-clock limit killed it,
    ``None`` when it ended by itself (``exit_code`` or ``signal`` tells how)."""

    isolation: Isolation
    exit_code: int | None = None
    signal: int | None = None
    stopped: Literal["deadline"] | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stderr_tail: str = ""


def _unshare() -> str | None:
    return shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None
    )


@functools.cache
def available_isolation() -> Isolation:
    """The strongest isolation this host allows (probed once per process)."""
    unshare = _unshare()
    if sys.platform != "linux" or unshare is None:
        return Isolation.PROCESS
    try:
        probe = subprocess.run(
            [unshare, *_UNSHARE_FLAGS, "true"], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return Isolation.PROCESS
    if probe.returncode != 0:
        log.warning(
            "user namespaces are not available here (%s): jobs run with limits and a clean "
            "environment only, not file-system or network isolation",
            probe.stderr.decode(errors="replace").strip()[:200],
        )
        return Isolation.PROCESS
    return Isolation.NAMESPACES


def choose_isolation(setting: str) -> Isolation:
    """The isolation for the ``sandbox`` setting: ``auto`` (the strongest available),
    ``required`` (namespaces or :class:`SandboxUnavailable`) or ``process``."""
    if setting == "process":
        return Isolation.PROCESS
    level = available_isolation()
    if setting == "required" and level is not Isolation.NAMESPACES:
        raise SandboxUnavailable(
            "the sandbox needs Linux user namespaces (`unshare --user` failed on this worker); "
            "allow them (e.g. run the worker's container with a seccomp profile that permits "
            "unshare) or set MPQ_SANDBOX=auto to accept weaker isolation"
        )
    return level


def clean_environment() -> dict[str, str]:
    """The child's whole environment: nothing of the worker's (no ``MPQ_*``, no credentials)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    # Thread counts are the operator's tuning, not secrets.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
        if name in os.environ:
            env[name] = os.environ[name]
    # The child imports the engine the worker imports, which is the copy the sandbox shows
    # (_readonly_paths): an editable install's finder may name another checkout, not shown.
    if (engine := _package_dir("mpq_core")) is not None:
        env["PYTHONPATH"] = str(Path(engine).parent)
    return env


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


def _readonly_paths(extra: Sequence[Path], job_dir: Path) -> list[str]:
    """What the child must read besides /usr: Python itself, its packages, ``mpq_core``.

    Raises:
        SandboxUnavailable: one of them holds the job folder, so the job would see the other
            jobs' folders through it.
    """
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    if (engine := _package_dir("mpq_core")) is not None:
        paths.add(engine)
    paths.update(str(Path(p).resolve()) for p in extra)
    # A path below /usr is there already; nested duplicates would be bound twice.
    chosen = sorted(p for p in paths if not p.startswith("/usr/") and p != "/usr")
    job = job_dir.resolve()
    for path in chosen:
        if job.is_relative_to(path):
            raise SandboxUnavailable(
                f"the job folder {job} lies inside {path}, which the sandbox shows to every job "
                "(the Python installation or mpq's code); keep MPQ_DATA_DIR outside it"
            )
    return chosen


def _init_config(
    argv: list[str], job_dir: Path, limits: SandboxLimits, isolation: Isolation,
    extra_readonly: Sequence[Path],
) -> dict[str, Any]:  # fmt: skip
    inside = isolation is Isolation.NAMESPACES
    places = {
        "{input}": "/job/input" if inside else str(job_dir / "input"),
        "{out}": "/job/out" if inside else str(job_dir / "out"),
    }
    args = [functools.reduce(lambda a, kv: a.replace(*kv), places.items(), a) for a in argv]
    return {
        "mode": isolation.value,
        "root": str(job_dir / ".root"),
        "input": str(job_dir / "input"),
        "out": str(job_dir / "out"),
        "readonly": _readonly_paths(extra_readonly, job_dir),
        "devices": [f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith("nvidia")],
        "tmp_bytes": limits.tmp_bytes,
        "limits": {
            "memory_bytes": limits.memory_bytes,
            "cpu_seconds": limits.cpu_seconds,
            "file_bytes": limits.file_bytes,
        },
        "argv": [sys.executable, *args],
        "env": clean_environment(),
        "cwd": places["{out}"],
    }


def _command(config: dict[str, Any], isolation: Isolation) -> list[str]:
    init = [sys.executable, "-I", "-m", "worker.sandbox_init", json.dumps(config)]
    if isolation is Isolation.NAMESPACES:
        unshare = _unshare()
        assert unshare is not None
        return [unshare, *_UNSHARE_FLAGS, *init]
    return init


def _pump(stream: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    try:
        while chunk := stream.readline(_LINE_MAX):
            lines.put(chunk)
    finally:
        lines.put(None)


def _tail(stream: IO[bytes], sink: list[bytes]) -> None:
    size = 0
    while chunk := stream.read(4096):
        sink.append(chunk)
        size += len(chunk)
        while size > _STDERR_TAIL and len(sink) > 1:
            size -= len(sink.pop(0))


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group; in ``namespaces`` mode that is ``unshare`` and the
    PID namespace's init, whose death takes every process of the namespace with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _prepare(job_dir: Path, isolation: Isolation) -> None:
    (job_dir / "out").mkdir(parents=True, exist_ok=True)
    if isolation is Isolation.NAMESPACES:
        (job_dir / ".root").mkdir(exist_ok=True)
    for path in (job_dir, job_dir / "input"):
        path.chmod(0o755)


def run_sandboxed(
    argv: list[str],
    job_dir: Path,
    *,
    limits: SandboxLimits,
    isolation: Isolation,
    on_message: Callable[[dict[str, Any]], None] = lambda m: None,
    tick: Callable[[], None] = lambda: None,
    tick_seconds: float = 2.0,
    extra_readonly: Sequence[Path] = (),
) -> SandboxOutcome:
    """Run ``python ARGV`` in a sandbox over ``job_dir`` (``{input}``/``{out}`` in ``argv`` are
    replaced by the child's view of the two folders) and return how it ended.

    ``on_message`` gets each JSON object the child prints on a line of its standard output;
    ``tick`` runs every ``tick_seconds``. Either may raise to stop the child (it is killed and
    the exception propagates). The wall-clock limit kills it with ``stopped="deadline"``.

    Example:
        >>> run_sandboxed(["-c", "print(1)"], tmp, limits=SandboxLimits(10),
        ...               isolation=available_isolation())  # doctest: +SKIP
    """
    _prepare(job_dir, isolation)
    config = _init_config(argv, job_dir, limits, isolation, extra_readonly)
    start = time.monotonic()
    before = os.times()
    proc = subprocess.Popen(
        _command(config, isolation),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_environment(),
        cwd=str(job_dir),
        start_new_session=True,
        close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1024)
    errors: list[bytes] = []
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True),
        threading.Thread(target=_tail, args=(proc.stderr, errors), daemon=True),
    ]
    for thread in threads:
        thread.start()
    outcome = SandboxOutcome(isolation=isolation)
    try:
        _follow(proc, lines, outcome, limits, start, on_message, tick, tick_seconds)
    finally:
        _kill_tree(proc)
        proc.wait()
        for thread in threads:
            thread.join(timeout=5)
    after = os.times()
    outcome.cpu_seconds = round(
        (after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        3,
    )
    outcome.seconds = round(time.monotonic() - start, 3)
    outcome.stderr_tail = b"".join(errors).decode("utf-8", "replace")
    _exit_status(proc.returncode, outcome)
    return outcome


def _exit_status(returncode: int, outcome: SandboxOutcome) -> None:
    if outcome.stopped is not None:
        return
    if returncode < 0:
        outcome.signal = -returncode
    elif returncode > 128 and returncode != SETUP_FAILED:
        outcome.signal = returncode - 128  # the init reports a job killed by signal N so
    else:
        outcome.exit_code = returncode


def _follow(
    proc: subprocess.Popen[bytes],
    lines: queue.Queue[bytes | None],
    outcome: SandboxOutcome,
    limits: SandboxLimits,
    start: float,
    on_message: Callable[[dict[str, Any]], None],
    tick: Callable[[], None],
    tick_seconds: float,
) -> None:
    """Read progress and tick until the child's output ends and it exits, or the deadline."""
    deadline = start + limits.wall_seconds
    next_tick = time.monotonic() + tick_seconds
    eof = False
    while True:
        now = time.monotonic()
        if now >= deadline:
            outcome.stopped = "deadline"
            return
        if now >= next_tick:
            tick()
            next_tick = now + tick_seconds
        if eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(0.2, max(0.0, deadline - now)))
            if proc.returncode is not None:
                return
            continue
        try:
            line = lines.get(timeout=min(0.2, max(0.0, deadline - now)))
        except queue.Empty:
            continue
        if line is None:
            eof = True
            continue
        message = _parse(line)
        if message is not None:
            on_message(message)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
