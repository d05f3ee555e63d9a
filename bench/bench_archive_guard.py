"""What intake's hostile-file guard costs, and what refusing a bomb costs.

- every model of the test zoo (tests/real_zoo.py), traced and exported: archive size, the
  guard's time (zip directory, configs, source/graph checks, sample inputs) as a share of the
  whole ``load_model``, measured in the same process (a ratio: the machine is shared);
- the bombs of tests/support/hostile_files.py: the declared expansion, the time to refuse and
  the peak of traced Python allocations during the refusal (the guard reads no data).

``python -m bench.bench_archive_guard`` writes ``bench/results/archive_guard.{md,json}``.
"""

from __future__ import annotations

import json
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

from mpq_core.archive_guard import check_model_archive
from mpq_core.data import load_data
from mpq_core.errors import MpqError
from mpq_core.intake import detect_format, load_model
from mpq_core.load_guard import check_sample_inputs
from tests.conftest import save_bytes
from tests.real_zoo import ZOO, build
from tests.support import hostile_files as hostile

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024**2


def _zoo_row(name: str, fmt: str) -> dict[str, Any]:
    entry = build(name)
    data = save_bytes(entry.module, tuple(entry.inputs(2, 0)), fmt)
    start = time.perf_counter()
    check_sample_inputs(check_model_archive(data, detect_format(data)))
    guard = time.perf_counter() - start
    start = time.perf_counter()
    load_model(data)  # runs the guard again, then torch's loader and mpq's own checks
    whole = time.perf_counter() - start
    return {
        "model": name,
        "format": fmt,
        "archive_kib": round(len(data) / 1024, 1),
        "guard_ms": round(guard * 1000, 1),
        "guard_share_of_load": round(guard / whole, 3),
    }


def _bomb_row(name: str, data: bytes, expanded: int, model: bool) -> dict[str, Any]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load_model(data) if model else load_data(data)
        code = "accepted"
    except MpqError as exc:
        code = exc.code
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "file": name,
        "file_mib": round(len(data) / MiB, 2),
        "declared_mib": round(expanded / MiB),
        "code": code,
        "refuse_ms": round(seconds * 1000, 1),
        "traced_peak_mib": round(peak / MiB, 2),
    }


def main() -> None:
    warnings.simplefilter("ignore")
    zoo = [_zoo_row(name, fmt) for name in ZOO for fmt in ("trace", "export")]
    bombs = [
        _bomb_row(
            "TorchScript + 1 GiB deflated record", hostile.torchscript_bomb(), 1024 * MiB, True
        ),
        _bomb_row("savez_compressed bomb", hostile.npz_bomb(), 1536 * MiB, False),
        _bomb_row(
            ".npz header (10^9, 10^4) float32",
            hostile.npz_with_header((10**9, 10**4)),
            4 * 10**13,
            False,
        ),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "archive_guard.json").write_text(json.dumps({"zoo": zoo, "bombs": bombs}, indent=1))
    lines = ["| model | format | archive KiB | guard ms | share of load |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['format']} | {r['archive_kib']} | {r['guard_ms']} | "
        f"{r['guard_share_of_load']:.1%} |"
        for r in zoo
    ]
    lines += ["", "| file | MiB | declares MiB | code | refused in ms | traced peak MiB |"]
    lines += ["|---|---|---|---|---|---|"]
    lines += [
        f"| {b['file']} | {b['file_mib']} | {b['declared_mib']} | {b['code']} | "
        f"{b['refuse_ms']} | {b['traced_peak_mib']} |"
        for b in bombs
    ]
    (RESULTS / "archive_guard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
