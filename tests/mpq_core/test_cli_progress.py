"""Progress of the long commands on stderr: plain lines in a log (stderr a pipe), counting bars
on a terminal (stderr a pseudo-terminal), each from the real ``mpq`` in a subprocess."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import termios
from pathlib import Path

from mpq_core.progress import STAGES, counted
from mpq_core.progress_display import ProgressLines

MPQ = [sys.executable, "-m", "mpq_core.cli"]


def _analyze(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """``mpq analyze`` in 3 batches of 8 samples (Fisher reports once per batch)."""
    extra = ("--batch-size", "8", *extra)
    model, data = files
    return [*MPQ, "analyze", str(model), "--data", str(data), "--out", str(out), *extra]


def _logged(cmd: list[str]) -> tuple[str, list[str]]:
    """Run ``cmd`` with stderr a pipe: all of stderr, and its ``mpq: `` lines."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr, [line for line in proc.stderr.splitlines() if line.startswith("mpq: ")]


# --- in a log: lines --------------------------------------------------------------------------


def test_lines_name_each_stage_start_and_end_and_count_in_units(
    cnn_files: tuple[Path, Path], tmp_path: Path
) -> None:
    stderr, lines = _logged(_analyze(cnn_files, tmp_path / "sens.json", "--progress-every", "0"))
    assert lines[0] == "mpq: fisher: started"
    assert lines[1:3] == ["mpq: fisher: 33% (1/3 batches)", "mpq: fisher: 66% (2/3 batches)"]
    assert re.fullmatch(r"mpq: fisher: done in \d+\.\d s", lines[3]), lines[3]
    assert len(lines) == 4
    assert "\r" not in stderr and "it/s" not in stderr


def test_lines_wait_the_interval_between_progress_lines(
    cnn_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """With an hour between progress lines, a short run writes only its start and end."""
    _, lines = _logged(_analyze(cnn_files, tmp_path / "sens.json", "--progress-every", "3600"))
    assert [line.rsplit(" in ", 1)[0] for line in lines] == [
        "mpq: fisher: started",
        "mpq: fisher: done",
    ]


def test_no_progress_writes_none(cnn_files: tuple[Path, Path], tmp_path: Path) -> None:
    cmd = _analyze(cnn_files, tmp_path / "sens.json", "--no-progress", "--progress-every", "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mpq: fisher" not in proc.stderr


def test_a_negative_interval_is_refused(cnn_files: tuple[Path, Path], tmp_path: Path) -> None:
    cmd = _analyze(cnn_files, tmp_path / "sens.json", "--progress-every", "-1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--progress-every" in proc.stderr


class _Clock:
    """A clock the test moves by hand (the one boundary faked here)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_throttle_progress_but_never_starts_and_ends() -> None:
    out, clock = io.StringIO(), _Clock()
    lines = ProgressLines(out, interval_s=5.0, clock=clock)
    lines("finetune", 0.0, {})
    for step in range(1, 10):  # 9 steps, one second apart
        clock.now += 1.0
        lines("finetune", step / 10, counted(step, 10, "steps", epoch=1, loss=0.25))
    clock.now += 0.5
    lines("finetune", 1.0, {"best_epoch": 1})
    assert out.getvalue().splitlines() == [
        "mpq: finetune: started",
        "mpq: finetune: 50% (5/10 steps) epoch=1 loss=0.25",
        "mpq: finetune: done in 9.5 s best_epoch=1",
    ]


# --- on a terminal: bars ------------------------------------------------------------------------


def _on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal; its exit status and what it drew there."""
    leader, follower = pty.openpty()
    termios.tcsetwinsize(follower, (24, 120))  # a new pty is 0 columns wide: no room for a bar
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower, stdin=None)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal_count_batches(cnn_files: tuple[Path, Path], tmp_path: Path) -> None:
    status, drawn = _on_a_terminal(_analyze(cnn_files, tmp_path / "sens.json"))
    assert status == 0, drawn
    assert "\r" in drawn, "a bar redraws its line"
    assert re.search(r"fisher: +100%.*\| 3/3 \[", drawn), drawn
    assert "batches/s" in drawn or "s/batches" in drawn, drawn
    assert "mpq: fisher: started" not in drawn and "it/s" not in drawn


def test_quantize_logs_every_stage_once_and_finetune_in_steps(
    cnn_files: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = cnn_files
    cmd = [*MPQ, "quantize", str(model), "--data", str(data), "--out-dir", str(tmp_path / "out")]
    cmd += ["--budget", "avg-bits=4", "--finetune.epochs", "1", "--finetune.batch-size", "8"]
    cmd += ["--no-runtime-exports", "--progress-every", "0"]
    _, lines = _logged(cmd)
    for stage in STAGES:
        ours = [line for line in lines if line.startswith(f"mpq: {stage}: ")]
        assert ours[0] == f"mpq: {stage}: started", (stage, lines)
        assert re.fullmatch(rf"mpq: {stage}: done in \d+\.\d s.*", ours[-1]), (stage, lines)
        assert sum(" started" in line or " done in " in line for line in ours) == 2, ours
    steps = [line for line in lines if line.startswith("mpq: finetune: ") and " steps)" in line]
    assert steps and re.fullmatch(
        r"mpq: finetune: \d+% \(\d+/\d+ steps\) epoch=1 loss=\S+", steps[0]
    )
    started = [line.split(": ")[1] for line in lines if line.endswith(": started")]
    assert started == list(STAGES)
