"""Showing a job's progress while :meth:`mpq_client.Client.wait` polls it.

On a terminal, one bar redrawn in place; anywhere else (a log file, CI, a pipe), plain lines
that stay readable: one whenever the status or stage changes, one at most every ``every_s``
seconds while only the percentage moves, and one for the final state.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from mpq_client.types import Job

__all__ = ["ProgressCallback", "ProgressPrinter"]

ProgressCallback = Callable[[Job], None]

BAR_WIDTH = 30


def _percent(job: Job) -> str:
    return f"{min(max(job.progress, 0.0), 1.0):6.1%}"


class ProgressPrinter:
    """A :data:`ProgressCallback` writing to ``stream`` (default ``sys.stderr``).

    Example::

        client.wait(job, progress=ProgressPrinter(sys.stdout, every_s=30))
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._clock = clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: tuple[str, str | None, float] | None = None
        self._last_line_at = float("-inf")
        self._bar_open = False  # a bar is drawn and its line not yet ended
        self._width = 0

    def __call__(self, job: Job) -> None:
        if self._tty:
            self._draw_bar(job)
        else:
            self._maybe_line(job)
        self.stream.flush()

    def _draw_bar(self, job: Job) -> None:
        filled = round(BAR_WIDTH * min(max(job.progress, 0.0), 1.0))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        stage = job.stage or "-"
        line = f"job {job.id[:8]} {job.status:<9} {stage:<12} [{bar}] {_percent(job)}"
        # Padded to the longest line drawn so far, so a shorter one covers all of it.
        self._width = max(self._width, len(line))
        self.stream.write("\r" + line.ljust(self._width) + ("\n" if job.is_final else ""))
        self._bar_open = not job.is_final

    def close(self) -> None:
        """End the bar's line if the wait stopped before the job ended (a timeout, Ctrl-C), so
        that what is printed next starts on a line of its own."""
        if self._bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self._bar_open = False

    def _maybe_line(self, job: Job) -> None:
        now = self._clock()
        state = (job.status, job.stage, job.progress)
        moved = self._last is None or state[:2] != self._last[:2] or job.is_final
        due = (
            self._last is not None
            and state != self._last
            and now - self._last_line_at >= self.every_s
        )
        if moved or due:
            stage = f", stage {job.stage}" if job.stage else ""
            self.stream.write(f"job {job.id}: {job.status}{stage}, {_percent(job).strip()}\n")
            self._last_line_at = now
        self._last = state
