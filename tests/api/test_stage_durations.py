"""Job stage durations accumulated in the database, on SQLite and Postgres, and what ``/metrics``
makes of them (read back through Prometheus's parser)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from api.job_metrics import JobMetrics
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from mpq_service.stage_durations import (
    BUCKETS_S,
    read_stage_histograms,
    record_stage_durations,
    stage_seconds,
)
from tests.api.metrics_text import Scrape

HISTOGRAM = "mpq_job_stage_duration_seconds"


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh, migrated database of each backend (the totals start at zero)."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("new_pg_url")()
    else:
        url = f"sqlite:///{tmp_path / 'mpq.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_stage_durations_accumulate_as_cumulative_buckets(
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        record_stage_durations(session, {"analyze": 0.3, "export": 20.0})
    with session_scope(sessions) as session:
        record_stage_durations(session, {"analyze": 0.05, "download": 2.0})
        record_stage_durations(session, {"analyze": 1e6, "upload": math.nan, "profile": -1.0})
    with sessions() as session:
        found = read_stage_histograms(session)
    assert set(found) == {"analyze", "download", "export"}  # NaN and negative are skipped
    analyze = dict(found["analyze"].buckets)
    assert (analyze["0.1"], analyze["0.5"], analyze[repr(BUCKETS_S[-1])], analyze["+Inf"]) == (
        1,
        2,
        2,
        3,
    )
    assert found["analyze"].count == 3 and math.isclose(found["analyze"].sum_s, 1e6 + 0.35)
    assert dict(found["export"].buckets)["15.0"] == 0 and found["export"].count == 1


def test_concurrent_jobs_all_count(sessions: sessionmaker[Session]) -> None:
    def finish_jobs() -> None:
        for _ in range(10):
            with session_scope(sessions) as session:
                record_stage_durations(session, {"quantize": 0.2, "analyze": 3.0})

    threads = [threading.Thread(target=finish_jobs) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with sessions() as session:
        found = read_stage_histograms(session)
    assert found["quantize"].count == found["analyze"].count == 40
    assert math.isclose(found["analyze"].sum_s, 120.0)


def test_metrics_expose_the_stage_histograms(sessions: sessionmaker[Session]) -> None:
    result = {
        "timings": {"intake": 0.01, "analyze": 4.0, "export": 0.2},
        "worker_timings": {"download": 0.3, "pipeline": 5.0, "upload": 0.4, "total": 6.0},
    }
    assert set(stage_seconds(result)) == {"intake", "analyze", "export", "download", "upload"}
    with session_scope(sessions) as session:
        record_stage_durations(session, stage_seconds(result))
    registry = CollectorRegistry()
    registry.register(JobMetrics(sessions))

    found = Scrape(generate_latest(registry).decode())
    assert found.families[HISTOGRAM].type == "histogram"
    assert found.value(f"{HISTOGRAM}_count", stage="analyze") == 1
    assert found.value(f"{HISTOGRAM}_sum", stage="analyze") == 4.0
    assert found.value(f"{HISTOGRAM}_bucket", stage="analyze", le="1.0") == 0
    assert found.value(f"{HISTOGRAM}_bucket", stage="analyze", le="5.0") == 1
    assert {labels["stage"] for labels in found.labels_of(f"{HISTOGRAM}_count")} == {
        "intake",
        "analyze",
        "export",
        "download",
        "upload",
    }
