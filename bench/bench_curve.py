"""The trade-off curve of the benchmark's character LM (bench/textlm.py, trained on Python's
docstrings): one sweep per sensitivity method over average widths 2 to 8, every allocation
quantized post-training (no fine-tuning) and scored on the held-out test windows, with the
uniform widths as the reference, drawn on one picture.

``python -m bench.bench_curve`` writes ``bench/results/curve_textlm.{json,md,svg,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.textlm import prepare_textlm
from mpq_core.plots import methods_figure, save_figure
from mpq_core.spec import AnalysisSpec, FinetuneSpec, JobSpec, Method
from mpq_core.sweep import run_sweep
from mpq_core.sweep_plan import Curve

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (Method.FISHER, Method.KL)
SWEEP = "avg-bits=2:8:0.5"
BITS = [2, 3, 4, 5, 6, 8]


def _curve(method: Method, model: Path, calib: Path, test: Path) -> Curve:
    spec = JobSpec(
        budgets=["avg-bits=4"],
        bits=BITS,
        sweep=[SWEEP],
        analysis=AnalysisSpec(method=method),
        finetune=FinetuneSpec(epochs=0),
    )
    return run_sweep(spec, model, calib, eval_data=test).curve


def _markdown(curves: list[Curve], meta: dict[str, Any]) -> str:
    first = curves[0]
    lines = [
        f"# Trade-off curve of the character LM ({meta['date']}; `python -m bench.bench_curve`)",
        "",
        f"Measured loss increase ({first.loss_unit}) on {first.eval_samples} held-out windows, "
        "no fine-tuning; size is the packed checkpoint as written.",
        "",
        "| series | budget | size | avg bits | measured loss increase |",
        "|---|---|---:|---:|---:|",
    ]
    rows = [("uniform", p) for p in first.uniform]
    rows += [(c.method, p) for c in curves for p in c.mixed]
    for series, p in rows:
        loss = "-" if p.measured_loss_increase is None else f"{p.measured_loss_increase:.4g}"
        lines.append(
            f"| {series} | {p.label} | {p.checkpoint_bytes:,.0f} B | {p.avg_bits:.2f} | {loss} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    lm = prepare_textlm()
    curves = []
    for method in METHODS:
        start = time.perf_counter()
        curves.append(_curve(method, lm.script_path, lm.calib_path, lm.test_path))
        print(f"{method.value}: {time.perf_counter() - start:.1f} s", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "sweep": SWEEP, "bits": BITS}
    text = _markdown(curves, meta)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        doc = {"meta": meta, "curves": {c.method: c.to_dict() for c in curves}}
        (RESULTS / "curve_textlm.json").write_text(json.dumps(doc, indent=1))
        (RESULTS / "curve_textlm.md").write_text(text)
        save_figure(methods_figure(curves), RESULTS / "curve_textlm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
