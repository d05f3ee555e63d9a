"""One job inside the worker's sandbox: ``python -m mpq_core.isolated_job JOB_JSON OUT_DIR``.

The worker (which holds the service's credentials) never loads an uploaded model itself. It
puts the job's inputs in a folder, starts this module in an isolated child process
(:mod:`worker.sandbox`) and reads back what it wrote. Everything here is plain files and
standard streams, so the child needs no database, storage or network.

Input, ``JOB_JSON`` (names are relative to its folder)::

    {"protocol": 1, "spec": {...}, "model": "model.bin", "data": "data.npz",
     "eval": "eval.npz" | null, "sensitivity": "sensitivity.json" | null,
     "max_upload_bytes": 2147483648 | null}

``max_upload_bytes`` is the service's upload limit: archives may expand to a multiple of it
(:class:`~mpq_core.archive_guard.ArchiveLimits`).

Output, in ``OUT_DIR``:

- progress on standard output, one JSON object per line: ``{"stage": ..., "fraction": ...}``
  (anything else the job prints goes to standard error);
- on success, the artefacts under ``OUT_DIR/artifacts/``, the sensitivity table as
  ``OUT_DIR/sensitivity.table.json`` and ``OUT_DIR/result.json``:
  ``{"report": {...}, "artifacts": {"model.pt": "artifacts/model.pt", ...}}``; exit code 0;
- on failure, ``OUT_DIR/error.json``: ``{"code": ..., "message": ...}``; exit code 2 for the
  user's problem (an :class:`~mpq_core.errors.MpqError`), 3 for anything else.

The parent treats all of it as untrusted: a hostile model can make this process write anything.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from mpq_core.errors import MpqError

__all__ = ["ERROR_FILE", "PROTOCOL", "RESULT_FILE", "TABLE_FILE", "main"]

PROTOCOL = 1
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
TABLE_FILE = "sensitivity.table.json"
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3

log = logging.getLogger("mpq.isolated_job")

# Out-of-memory reports from PyTorch's allocators (the sandbox's memory limit makes them fail).
_OOM_MARKERS = ("can't allocate memory", "out of memory", "DefaultCPUAllocator")


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, allow_nan=False, default=str))


def _progress_writer(stream: IO[str]) -> Any:
    def progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        stream.write(json.dumps({"stage": stage, "fraction": float(fraction)}) + "\n")
        stream.flush()

    return progress


def _run(job_file: Path, out: Path, progress_stream: IO[str]) -> None:
    from mpq_core.archive_guard import DEFAULT_LIMITS, ArchiveLimits
    from mpq_core.pipeline import quantize_model
    from mpq_core.sensitivity_table import SensitivityTable
    from mpq_core.spec import JobSpec

    job = json.loads(job_file.read_text())
    if job.get("protocol") != PROTOCOL:
        raise MpqError(f"unknown job protocol {job.get('protocol')!r}", code="internal_error")
    folder = job_file.parent
    spec = JobSpec.from_dict(job["spec"])
    upload_limit = job.get("max_upload_bytes")
    limits = ArchiveLimits.for_upload_limit(upload_limit) if upload_limit else DEFAULT_LIMITS
    cached = SensitivityTable.load(folder / job["sensitivity"]) if job.get("sensitivity") else None
    result = quantize_model(
        folder / job["model"],
        folder / job["data"],
        spec,
        out / "artifacts",
        eval_source=folder / job["eval"] if job.get("eval") else None,
        sensitivity=cached,
        progress=_progress_writer(progress_stream),
        limits=limits,
    )
    result.sensitivity.save(out / TABLE_FILE)
    artifacts = {name: str(path.relative_to(out)) for name, path in result.artifacts.items()}
    _write_json(out / RESULT_FILE, {"report": result.report, "artifacts": artifacts})


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)
    )


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:500]


def main(argv: list[str] | None = None) -> int:
    """Run the job described by ``argv[0]`` (job.json) into ``argv[1]`` (out folder)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m mpq_core.isolated_job JOB_JSON OUT_DIR", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    job_file, out = Path(args[0]), Path(args[1])
    # Progress gets standard output to itself: whatever the job prints goes to standard error.
    progress_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        _run(job_file, out, progress_stream)
        return 0
    except MpqError as exc:
        _write_json(out / ERROR_FILE, {"code": exc.code, "message": exc.message})
        return EXIT_USER_ERROR
    except BaseException as exc:  # every failure must reach the parent as a code
        if _is_out_of_memory(exc):
            _write_json(
                out / ERROR_FILE,
                {"code": "memory_limit_exceeded", "message": "the job ran out of memory"},
            )
            return EXIT_USER_ERROR
        traceback.print_exc()
        _write_json(out / ERROR_FILE, {"code": "internal_error", "message": _one_line(exc)})
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
