"""Progress reports (:mod:`mpq_core.progress`) shown on stderr by the CLI: a bar per stage on a
terminal (:class:`ProgressBars`), plain lines otherwise (:class:`ProgressLines`: a CI log or a
file keeps one line per stage start and end, and at most one progress line every few seconds).

Kept apart from :mod:`mpq_core.progress`, which the engine, the worker and the API import: only
the CLI draws bars (tqdm).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from mpq_core.progress import COUNT_KEYS

__all__ = ["ProgressBars", "ProgressDisplay", "ProgressLines", "stderr_progress"]

_PERCENT_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]"


def _extras(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics worth showing beside the count (numbers and short strings)."""
    return {
        k: v
        for k, v in metrics.items()
        if k not in COUNT_KEYS and isinstance(v, int | float | str) and not isinstance(v, bool)
    }


def _count(metrics: dict[str, Any]) -> tuple[int, int, str] | None:
    done, total, unit = (metrics.get(k) for k in COUNT_KEYS)
    if isinstance(done, int) and isinstance(total, int) and total > 0 and isinstance(unit, str):
        return done, total, unit
    return None


class ProgressDisplay(Protocol):
    """A progress callback that owns something to release when the command ends."""

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class ProgressBars:
    """A tqdm bar per stage on ``stream``, counting the stage's units (``12/40 batches``), or in
    percent for a stage that reports no count."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        from tqdm import tqdm

        count = _count(metrics)
        total, unit = (count[1], count[2]) if count else (100, "%")
        bar = self._bars.get(stage)
        if bar is None:
            # initial: a stage first heard of after some work is done has no rate for it yet
            bar = self._bars[stage] = tqdm(
                total=total,
                initial=count[0] if count else 0,
                desc=stage,
                unit=unit,
                leave=True,
                file=self.stream,
                # A stage that counts nothing shows its share and time, not a rate of "%".
                bar_format=None if count else _PERCENT_BAR,
            )
        elif count and (bar.total != total or bar.unit != unit):
            # The stage began before it knew its count.
            bar.total, bar.unit, bar.bar_format = total, unit, None
        fraction = min(max(fraction, 0.0), 1.0)
        bar.n = count[0] if count else round(fraction * bar.total)
        if fraction >= 1.0:
            bar.n = bar.total
        if extras := _extras(metrics):
            bar.set_postfix(extras, refresh=False)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressLines:
    """Plain lines for a log: ``stage: started``, ``stage: 40% (12/30 batches) loss=0.31`` at
    most every ``interval_s`` seconds, and ``stage: done in 2.3 s``.

    Args:
        stream: where the lines go (stderr by default), flushed line by line.
        interval_s: least time between two progress lines (0: every report); starts and ends
            are always written.
        clock: the time source, in seconds.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        self._started: dict[str, float] = {}
        self._last_line = -float("inf")

    def _write(self, stage: str, text: str) -> None:
        print(f"mpq: {stage}: {text}", file=self.stream, flush=True)

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        now = self.clock()
        if stage not in self._started:
            self._started[stage] = self._last_line = now
            self._write(stage, "started")
        if fraction >= 1.0:
            self._finish(stage, now, metrics)
            return
        if now - self._last_line < self.interval_s or fraction <= 0.0:
            return
        self._last_line = now
        text = f"{math.floor(100 * fraction)}%"  # 99% until the stage is done
        if count := _count(metrics):
            text += f" ({count[0]}/{count[1]} {count[2]})"
        extras = " ".join(f"{k}={_number(v)}" for k, v in _extras(metrics).items())
        self._write(stage, f"{text} {extras}".rstrip())

    def _finish(self, stage: str, now: float, metrics: dict[str, Any]) -> None:
        began = self._started.pop(stage, now)
        extras = " ".join(f"{k}={_number(v)}" for k, v in _extras(metrics).items())
        self._write(stage, f"done in {now - began:.1f} s {extras}".rstrip())

    def close(self) -> None:
        """Nothing to release: a stage cut short by an error keeps its last line."""


def stderr_progress(*, enabled: bool = True, interval_s: float = 5.0) -> ProgressDisplay:
    """The CLI's progress display: bars when stderr is a terminal, else lines (at most one
    progress line every ``interval_s`` seconds); nothing when not ``enabled``."""
    if not enabled:
        return _Silent()
    if sys.stderr.isatty():
        return ProgressBars(sys.stderr)
    return ProgressLines(sys.stderr, interval_s=interval_s)
