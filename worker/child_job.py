"""One job's pipeline run in the sandbox, seen from the worker: :func:`run_child_job`.

It writes ``input/job.json`` for :mod:`mpq_core.isolated_job`, runs that module with
:func:`worker.sandbox.run_sandboxed`, and reads back what the child left in ``out/`` as untrusted
data: every file is opened without following links, must be a regular file of bounded size
under a plain name, and is copied into a folder only the worker writes before anything is
uploaded; ``result.json`` and ``error.json`` are parsed with size caps, and an error code must
look like one. How the child ended becomes a failed job with a specific code
(:class:`~mpq_core.errors.MpqError`), never a worker crash.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq_core.errors import MpqError
from mpq_service.reaper import time_limit_message
from worker.sandbox import SETUP_FAILED, Isolation, SandboxLimits, SandboxOutcome, run_sandboxed

__all__ = ["ChildJob", "ChildResult", "run_child_job"]

log = logging.getLogger(__name__)

#: The child's command line after ``python`` (``{input}``/``{out}``: its view of the folders).
CHILD_ARGV = ("-m", "mpq_core.isolated_job", "{input}/job.json", "{out}")
_JSON_MAX = 32 * 1024**2
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MESSAGE_MAX = 1000


@dataclass(frozen=True)
class ChildJob:
    """What the child needs, as names of files already in ``job_dir/input``."""

    spec: dict[str, Any]
    model: str
    data: str
    eval: str | None = None
    sensitivity: str | None = None
    max_upload_bytes: int | None = None


@dataclass
class ChildResult:
    """What the child produced, copied into worker-owned files."""

    report: dict[str, Any]
    artifacts: dict[str, Path]
    table: Path | None
    outcome: SandboxOutcome


def _reject_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _read_json(out: Path, name: str) -> dict[str, Any] | None:
    """``out/name`` parsed, or None when absent or not a JSON object of sane size."""
    try:
        fd = os.open(out / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        raw = f.read(_JSON_MAX + 1)
    if len(raw) > _JSON_MAX:
        return None
    try:
        value = json.loads(raw, parse_constant=_reject_constants)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _copy_out(out: Path, relative: str, dest: Path, limit: int) -> None:
    """Copy the child's ``out/relative`` (``artifacts/NAME``) to ``dest``, refusing links,
    odd names, special files and sizes past ``limit``."""
    parts = relative.split("/")
    if len(parts) != 2 or parts[0] != "artifacts" or not _NAME.fullmatch(parts[1]):
        raise _bad_output(f"an artefact path {relative[:100]!r} that is not artifacts/NAME")
    flags = os.O_RDONLY | os.O_NOFOLLOW
    dir_fd = os.open(out / "artifacts", flags | os.O_DIRECTORY)
    try:
        fd = os.open(parts[1], flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _bad_output(f"an unreadable artefact {parts[1]!r} ({exc.strerror})") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as src, open(dest, "wb") as dst:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise _bad_output(f"an artefact {parts[1]!r} that is not a regular file of sane size")
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)


def _bad_output(what: str) -> MpqError:
    return MpqError(f"the job's process produced {what}; nothing was stored", code="job_output")


def _failure(outcome: SandboxOutcome, out: Path, limits: SandboxLimits) -> MpqError:
    """The error for a child that did not succeed."""
    if outcome.stopped == "deadline":
        return MpqError(time_limit_message(round(limits.wall_seconds)), code="time_limit_exceeded")
    if outcome.signal is not None:
        return _killed(outcome, limits)
    if outcome.exit_code == SETUP_FAILED:
        tail = outcome.stderr_tail.strip().splitlines()[-1:] or ["no message"]
        return MpqError(f"the job's sandbox could not be set up: {tail[0][:300]}", code="sandbox")
    error = _read_json(out, "error.json") or {}
    code, message = error.get("code"), error.get("message")
    if isinstance(code, str) and _CODE.fullmatch(code) and isinstance(message, str):
        if code == "memory_limit_exceeded":
            message = _memory_message(limits)
        return MpqError(message[:_MESSAGE_MAX], code=code)
    return MpqError(
        f"the job's process exited with code {outcome.exit_code} without a result",
        code="internal_error",
    )


def _memory_message(limits: SandboxLimits) -> str:
    size = f"{limits.memory_bytes / 2**30:.1f} GiB" if limits.memory_bytes else "the machine's"
    return (
        f"the job ran out of memory (limit {size}); batch sizes are planned to fit it, but this "
        "job needed more than planned: set a lower max_memory (smaller batches, more "
        "headroom), or ask the operator for a larger MPQ_SANDBOX_MEMORY_BYTES"
    )


def _killed(outcome: SandboxOutcome, limits: SandboxLimits) -> MpqError:
    sig = outcome.signal or 0
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    cpu = limits.cpu_seconds
    if sig == signal.SIGXCPU or (
        sig == signal.SIGKILL and cpu is not None and outcome.cpu_seconds >= cpu
    ):
        return MpqError(
            f"the job used more than its CPU-time limit of {cpu} s and was stopped",
            code="cpu_time_limit_exceeded",
        )
    if sig == signal.SIGKILL:
        return MpqError(
            "the job's process was killed (SIGKILL), most likely by the kernel for using too "
            f"much memory; {_memory_message(limits)}",
            code="memory_limit_exceeded",
        )
    return MpqError(
        f"the job's process crashed ({name}) while running the model; the model may use an "
        "operator that fails on this input, or a PyTorch bug",
        code="job_crashed",
    )


def _collect(outcome: SandboxOutcome, out: Path, staging: Path, limit: int) -> ChildResult:
    result = _read_json(out, "result.json")
    if result is None or not isinstance(result.get("report"), dict):
        raise _bad_output("no readable result.json")
    listed = result.get("artifacts")
    if not isinstance(listed, dict) or not listed:
        raise _bad_output("no artefact list")
    staging.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Path] = {}
    for name, relative in listed.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(relative, str):
            raise _bad_output(f"an artefact named {str(name)[:100]!r}")
        artifacts[name] = staging / name
        _copy_out(out, relative, artifacts[name], limit)
    table: Path | None = None
    if (stored := _read_json(out, "sensitivity.table.json")) is not None:
        table = staging / "sensitivity.table.json"
        table.write_text(json.dumps(stored))
    return ChildResult(result["report"], artifacts, table, outcome)


def run_child_job(
    job: ChildJob,
    job_dir: Path,
    *,
    limits: SandboxLimits,
    isolation: Isolation,
    on_progress: Callable[[str, float], None],
    tick: Callable[[], None],
) -> ChildResult:
    """Run the pipeline for ``job`` in the sandbox; its result, or an :class:`MpqError`."""
    payload = {
        "protocol": 1,
        "spec": job.spec,
        "model": job.model,
        "data": job.data,
        "eval": job.eval,
        "sensitivity": job.sensitivity,
        "max_upload_bytes": job.max_upload_bytes,
    }
    (job_dir / "input" / "job.json").write_text(json.dumps(payload))

    def on_message(message: dict[str, Any]) -> None:
        stage, fraction = message.get("stage"), message.get("fraction")
        if isinstance(stage, str) and isinstance(fraction, int | float):
            on_progress(stage[:64], float(fraction))

    outcome = run_sandboxed(
        list(CHILD_ARGV),
        job_dir,
        limits=limits,
        isolation=isolation,
        on_message=on_message,
        tick=tick,
    )
    out = job_dir / "out"
    if outcome.stderr_tail.strip():
        log.info("job process output (last lines):\n%s", outcome.stderr_tail[-4000:])
    if outcome.stopped is not None or outcome.signal is not None or outcome.exit_code != 0:
        raise _failure(outcome, out, limits)
    return _collect(outcome, out, job_dir / "staging", limits.file_bytes or 2**40)
