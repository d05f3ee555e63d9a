"""Job durations by stage, accumulated in the database as a histogram (``job_stage_durations``).

The database is the one place every worker writes and every API process reads, so the totals at
``/metrics`` are the same whichever API process is scraped, and survive restarts; counters kept
in a worker's memory would never be scraped. A worker adds a succeeded job's stage times in the
transaction that records the success (:func:`record_stage_durations`), so a job counts once even
when that write is retried; ``/metrics`` reads the few rows back (:func:`read_stage_histograms`).

Stages are the pipeline's (``intake`` ... ``export``, from the job report's ``timings``) and the
worker's own ``download`` and ``upload``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mpq_service.tables import StageDuration

__all__ = [
    "BUCKETS_S",
    "StageHistogram",
    "bucket_label",
    "read_stage_histograms",
    "record_stage_durations",
    "stage_seconds",
]

#: Upper bounds of the buckets, in seconds: stages take from milliseconds to hours.
BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0)
_INF = "+Inf"


def bucket_label(seconds: float) -> str:
    """The ``le`` of the first bucket holding ``seconds`` (Prometheus's spelling of the bound)."""
    for bound in BUCKETS_S:
        if seconds <= bound:
            return repr(bound)
    return _INF


def stage_seconds(result: Mapping[str, Any]) -> dict[str, float]:
    """The stage durations in a succeeded job's ``result``: the pipeline's ``timings`` and the
    worker's ``download`` and ``upload`` (its ``pipeline`` and ``total`` span other stages)."""
    found: dict[str, float] = {}
    for stage, value in dict(result.get("timings") or {}).items():
        if isinstance(value, (int, float)):
            found[str(stage)] = float(value)
    worker = dict(result.get("worker_timings") or {})
    for stage in ("download", "upload"):
        if isinstance(worker.get(stage), (int, float)):
            found[stage] = float(worker[stage])
    return found


def record_stage_durations(session: Session, seconds_by_stage: Mapping[str, float]) -> None:
    """Add one job's stage durations (in the caller's transaction).

    Rows are updated in stage order, so concurrent workers lock them in the same order (no
    deadlock). Non-finite or negative values are skipped: a histogram cannot hold them.
    """
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    for stage in sorted(seconds_by_stage):
        value = float(seconds_by_stage[stage])
        if not math.isfinite(value) or value < 0:
            continue
        stmt = insert(StageDuration).values(
            stage=stage[:64], le=bucket_label(value), observations=1, seconds=value
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[StageDuration.stage, StageDuration.le],
                set_={
                    "observations": StageDuration.observations + 1,
                    "seconds": StageDuration.seconds + stmt.excluded.seconds,
                },
            )
        )


@dataclass(frozen=True)
class StageHistogram:
    """One stage's histogram: cumulative ``(le, count)`` buckets ending with ``+Inf``, and the
    sum of all durations."""

    buckets: list[tuple[str, int]]
    sum_s: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1]


def _bound(le: str) -> float:
    return math.inf if le == _INF else float(le)


def read_stage_histograms(session: Session) -> dict[str, StageHistogram]:
    """Every stage's histogram, from the stored buckets (any bounds stored under earlier
    :data:`BUCKETS_S` are kept as buckets of their own)."""
    by_stage: dict[str, dict[str, tuple[int, float]]] = {}
    for row in session.execute(select(StageDuration)).scalars():
        by_stage.setdefault(row.stage, {})[row.le] = (row.observations, row.seconds)
    histograms = {}
    for stage, rows in sorted(by_stage.items()):
        bounds = sorted({repr(b) for b in BUCKETS_S} | set(rows) | {_INF}, key=_bound)
        running = 0
        buckets = []
        for le in bounds:
            running += rows.get(le, (0, 0.0))[0]
            buckets.append((le, running))
        histograms[stage] = StageHistogram(buckets, sum(s for _, s in rows.values()))
    return histograms
