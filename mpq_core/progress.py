"""One progress callback for every long stage: ``progress(stage, fraction, metrics)``.

A report that counts something carries ``done``, ``total`` and ``unit`` in its metrics
(:func:`counted`: 12 of 40 batches, 300 of 900 steps), so a display shows units, not a bare
fraction. The CLI shows the reports on stderr (:mod:`mpq_core.progress_display`); the worker
turns them into job progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["COUNT_KEYS", "STAGES", "ProgressFn", "StageClock", "counted", "null_progress"]

#: The stages of a job, in order (each reports progress under its name).
STAGES = ("intake", "profile", "analyze", "allocate", "quantize", "finetune", "evaluate", "export")

ProgressFn = Callable[[str, float, dict[str, Any]], None]

#: The metrics keys of :func:`counted`, which displays show as ``done/total unit``.
COUNT_KEYS = ("done", "total", "unit")


def null_progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
    """Discard progress reports."""


def counted(done: int, total: int, unit: str, **metrics: Any) -> dict[str, Any]:
    """The metrics of a report that has counted ``done`` of ``total`` ``unit`` (a plural noun:
    ``"batches"``, ``"steps"``), plus any other ``metrics``."""
    return {"done": done, "total": total, "unit": unit, **metrics}


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
