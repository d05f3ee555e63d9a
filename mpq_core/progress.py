"""One progress callback for every long stage: ``progress(stage, fraction, metrics)``.

The CLI turns it into terminal progress bars; the worker turns it into job progress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["STAGES", "ProgressFn", "StageClock", "TerminalProgress", "null_progress"]

#: The stages of a job, in order (each reports progress under its name).
STAGES = ("intake", "profile", "analyze", "allocate", "quantize", "finetune", "evaluate", "export")

ProgressFn = Callable[[str, float, dict[str, Any]], None]


def null_progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
    """Discard progress reports."""


class TerminalProgress:
    """A tqdm bar per stage on stderr (silent when stderr is not a terminal unless forced)."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=1000, desc=stage, leave=True, file=sys.stderr)
        bar.n = round(min(max(fraction, 0.0), 1.0) * 1000)
        if metrics:
            bar.set_postfix({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


class StageClock:
    """Progress reports and the time of every stage of one job."""

    def __init__(self, progress: ProgressFn, seconds: dict[str, float] | None = None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name, 0.0, {})
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)
        self.progress(name, 1.0, {})

    def forward(self, stage: str) -> ProgressFn:
        """Re-label a library function's progress reports as this stage's."""

        def report(_: str, fraction: float, metrics: dict[str, Any]) -> None:
            self.progress(stage, min(fraction, 0.999), metrics)

        return report
