"""Metrics read from the database at scrape time: jobs by status, the queue, stage durations.

The database is the shared truth of every API process and worker, so any API process answers
the same numbers, and nothing is lost when a worker restarts. One scrape costs one ``GROUP BY``
over ``jobs`` (a few rows per status) and a read of the few ``job_stage_durations`` rows. A
database that cannot be reached is no reason to fail the scrape: it reports
``mpq_database_up 0`` and leaves the database's metrics out (the request metrics still come).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.job_status import JOB_STATUSES, JobStatus
from mpq_service.reaper import first_line
from mpq_service.stage_durations import StageHistogram, read_stage_histograms
from mpq_service.tables import Job

__all__ = ["JobMetrics"]

log = logging.getLogger("mpq.api.metrics")


def _read(session: Session) -> tuple[dict[str, int], dict[str, StageHistogram]]:
    counts = {status: 0 for status in JOB_STATUSES}
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = count
    return counts, read_stage_histograms(session)


class JobMetrics(Collector):
    """A Prometheus collector over the service's database (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "mpq_database_up", "1 when the database answered this scrape, else 0."
        )
        try:
            with self.sessions() as session:
                counts, stages = _read(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable: %s", first_line(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("mpq_jobs", "Jobs by status.", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "mpq_queue_depth",
            "Jobs waiting for a worker (status queued).",
            value=counts[JobStatus.QUEUED.value],
        )
        durations = HistogramMetricFamily(
            "mpq_job_stage_duration_seconds",
            "How long each stage of succeeded jobs took (pipeline stages, download, upload).",
            labels=["stage"],
        )
        for stage, histogram in stages.items():
            durations.add_metric([stage], histogram.buckets, histogram.sum_s)
        yield durations
