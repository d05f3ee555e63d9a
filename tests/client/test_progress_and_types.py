"""The client's progress display on a real terminal (a pty) and in a log, its lenient parsing
of what the API returns, and its import without torch or the service's libraries."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from mpq_client import Artifact, Job, Model, ProgressPrinter
from mpq_client.types import parse_time


def _job(status: str, stage: str | None, progress: float) -> Job:
    return Job(id="0123456789ab", status=status, stage=stage, progress=progress)


def _read_all(leader: int) -> str:
    """Everything written to the terminal (whose other end is closed), without the ``\r``
    the terminal adds before each ``\n``."""
    chunks = []
    try:
        while chunk := os.read(leader, 4096):
            chunks.append(chunk)
    except OSError:  # EIO: the other end is closed and everything was read
        pass
    finally:
        os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_on_a_terminal_one_bar_is_redrawn_in_place() -> None:
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        printer = ProgressPrinter(tty)
        printer(_job("running", "analyze", 0.5))
        printer(_job("succeeded", "export", 1.0))
        printer.close()  # the bar's line ended with the job: nothing more to write
    shown = _read_all(leader)
    first, second = shown.split("\r")[1:]
    assert first.startswith("job 01234567 running   analyze")
    assert "[" + "#" * 15 + "-" * 15 + "]" in first and first.endswith(" 50.0%")
    assert "[" + "#" * 30 + "]" in second and second.rstrip("\r\n").endswith("100.0%")
    assert shown.endswith("\n") and shown.count("\n") == 1


def test_a_shorter_bar_covers_the_longer_one_and_close_ends_an_unfinished_line() -> None:
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        printer = ProgressPrinter(tty)
        printer(_job("running", "a-stage-with-a-long-name", 0.2))
        printer(_job("running", "export", 0.9))
        printer.close()
    shown = _read_all(leader)
    first, second = shown.split("\r")[1:]
    assert first.startswith("job 01234567 running   a-stage-with-a-long-name")
    assert second.startswith("job 01234567 running   export")
    assert second.endswith("\n") and len(second.rstrip("\n")) == len(first)


def test_in_a_log_a_line_per_change_and_every_few_seconds_while_only_progress_moves() -> None:
    out, now = io.StringIO(), [0.0]
    printer = ProgressPrinter(out, every_s=10, clock=lambda: now[0])
    for t, job in [
        (0, _job("queued", None, 0.0)),
        (1, _job("queued", None, 0.0)),  # nothing changed: no line
        (2, _job("running", "analyze", 0.1)),  # a new status: a line at once
        (5, _job("running", "analyze", 0.2)),  # progress only, 3 s after the last line
        (13, _job("running", "analyze", 0.3)),  # progress only, 11 s after: a line
        (14, _job("succeeded", "export", 1.0)),
    ]:
        now[0] = t
        printer(job)
    assert out.getvalue().splitlines() == [
        "job 0123456789ab: queued, 0.0%",
        "job 0123456789ab: running, stage analyze, 10.0%",
        "job 0123456789ab: running, stage analyze, 30.0%",
        "job 0123456789ab: succeeded, stage export, 100.0%",
    ]


def test_times_parse_in_every_form_the_api_may_write() -> None:
    utc = timezone.utc
    assert parse_time("2026-12-06T18:49:18Z") == datetime(2026, 12, 6, 18, 49, 18, tzinfo=utc)
    assert parse_time("2026-12-06T18:49:18.5+00:00") == datetime(
        2026, 12, 6, 18, 49, 18, 500000, tzinfo=utc
    )
    assert parse_time("2026-12-06T20:49:18.123456789+02:00") == datetime(
        2026, 12, 6, 18, 49, 18, 123456, tzinfo=utc
    )
    naive = parse_time("2026-12-06T18:49:18")
    assert naive is not None and naive.utcoffset() == timedelta(0)
    assert parse_time("yesterday") is None and parse_time(None) is None


def test_parsing_ignores_unknown_fields_and_defaults_missing_ones() -> None:
    job = Job.from_api(
        {
            "id": "j",
            "status": "failed",
            "error": {"code": "budget_infeasible", "message": "too small", "hint": "more"},
            "webhook_url": "https://example.invalid/hook",  # a field of a newer server
            "created_at": "2026-12-06T18:49:18Z",
        }
    )
    assert job.error is not None and job.error.code == "budget_infeasible"
    assert job.is_final and job.progress == 0.0 and job.model_id is None and job.result is None
    assert job.created_at is not None and job.finished_at is None
    model = Model.from_api({"id": "m", "size": 3, "etag": "x"})
    assert (model.id, model.size, model.filename, model.created_at) == ("m", 3, "", None)
    artifact = Artifact.from_api({"name": "model.pt", "sha256": "ab", "size": 2, "digest": "?"})
    assert (artifact.name, artifact.sha256, artifact.size) == ("model.pt", "ab", 2)


def test_the_client_loads_neither_torch_nor_the_service() -> None:
    probe = (
        "import sys, mpq_client; "
        "print(sorted({'torch', 'numpy', 'fastapi', 'pydantic', 'sqlalchemy', 'mpq_core'} "
        "& set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
