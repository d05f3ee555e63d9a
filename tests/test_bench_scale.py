"""bench/bench_scale.py: its smallest decoder has the stated size, a measurement child reports a
time and a peak memory, and the results merge by size and sequences, stage by stage."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import bench_scale


# About 14 CPU seconds (importing transformers, tracing, one child): marked slow because on a
# busy 2-core machine that is well over 20 s of wall time.
@pytest.mark.slow
def test_1m_decoder_has_its_stated_size_and_a_fwdbwd_child_reports_time_and_memory(
    tmp_path: Path,
) -> None:
    meta = bench_scale.build(bench_scale.SIZES["1m"], tmp_path)
    assert abs(meta["params"] - 1_000_000) / 1_000_000 < 0.05, meta
    bench_scale.write_data(tmp_path, bench_scale.SIZES["1m"].vocab, 4)
    args = argparse.Namespace(batch_size=4, timeout=120)
    out = bench_scale.run_child("fwdbwd", "1m", tmp_path, 4, args)
    assert "error" not in out, out
    assert out["seconds"] > 0 and out["peak_gib"] > 0 and out["batches"] == 1


def test_a_child_past_its_timeout_is_recorded_not_raised(tmp_path: Path) -> None:
    # Importing torch alone takes longer than a second: the child is killed, and the parent
    # records the timeout instead of raising.
    args = argparse.Namespace(batch_size=2, timeout=1)
    out = bench_scale.run_child("fwdbwd", "1m", tmp_path, 2, args)
    assert out["error"] == "timeout after 1 s", out


def test_results_merge_stage_by_stage_by_size_and_sequences() -> None:
    old = {"runs": {"1m@64": {"size": "1m", "sequences": 64, "stages": {"fwdbwd": {"seconds": 1}}}}}
    row = {"size": "1m", "sequences": 64, "stages": {"analyze": {"seconds": 5}}}
    other = {"size": "10m", "sequences": 64, "stages": {"fwdbwd": {"seconds": 2}}}
    merged = bench_scale.merge(old, [row, other], {"commit": "c"})
    assert set(merged["runs"]) == {"1m@64", "10m@64"}
    assert set(merged["runs"]["1m@64"]["stages"]) == {"fwdbwd", "analyze"}
