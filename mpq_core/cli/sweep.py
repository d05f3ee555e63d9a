"""``mpq sweep``: the trade-off curve of one model, many budgets, one sensitivity analysis."""

from __future__ import annotations

import argparse
import math
from typing import Any

from mpq_core.cli.allocate import BUDGET_FIELDS
from mpq_core.cli.analyze import ANALYSIS_FIELDS
from mpq_core.cli.inputs import add_job_arguments
from mpq_core.cli.progress_args import add_progress_arguments, progress_from_args
from mpq_core.cli.spec_args import add_spec_arguments, spec_from_args

__all__ = ["add_parser", "format_curve", "run"]

#: The job spec fields ``mpq sweep`` takes (``sweep`` itself is required).
SWEEP_FIELDS = tuple(
    dict.fromkeys(  # in order, each once (bits is in both lists)
        (
            "sweep",
            *BUDGET_FIELDS,
            *ANALYSIS_FIELDS,
            "max_memory",
            "eval_fraction",
            "device",
            "quantize_activations",
        )
    )
)


def add_parser(subparsers: Any) -> None:
    """Register the ``sweep`` subcommand."""
    p = subparsers.add_parser(
        "sweep",
        help="measure the size/accuracy trade-off curve over a range of budgets",
        description=(
            "Score the layers once, then for every --sweep budget choose bits, quantize (no "
            "fine-tuning) and evaluate; every uniform width is measured too, as the reference. "
            "Writes curve.json, sensitivity.json and plots (curve, sensitivity, and bits of the "
            "--budgets allocation, which is marked on the curve) into --out-dir."
        ),
    )
    add_job_arguments(p)
    add_spec_arguments(p, SWEEP_FIELDS, required=["sweep"])
    add_progress_arguments(p)
    p.set_defaults(func=run)


def _cell(value: float | None, fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, fmt)


def format_curve(curve: Any) -> str:
    """The points as a table: series, budget, size, average bits, predicted and measured loss
    rise, the metric; the chosen point last."""
    from mpq_core.budgets import format_value

    points = [*curve.mixed, *curve.uniform]
    if curve.chosen is not None:
        points.append(curve.chosen)
    width = max([len("budget")] + [len(p.label) for p in points])
    head = (
        f"{'series':<8}  {'budget':<{width}}  {'size':>10}  {'bits':>5}  "
        f"{'predicted':>10}  {'measured':>10}  {curve.metric:>10}"
    )
    lines = [head]
    for p in points:
        lines.append(
            f"{p.series:<8}  {p.label:<{width}}  {format_value('size', p.checkpoint_bytes):>10}  "
            f"{p.avg_bits:>5.2f}  {_cell(p.predicted_metric_loss_increase, '10.4g')}  "
            f"{_cell(p.measured_loss_increase, '10.4g')}  {_cell(p.metric(curve.metric), '10.4f')}"
        )
    base = curve.float_metrics.get(curve.metric)
    lines.append(
        f"float model: {curve.metric} {_cell(base, '.4f')}; loss increase {curve.loss_unit}, "
        f"predicted by {curve.method}, measured on {curve.eval_samples} samples"
    )
    lines += [f"skipped {s['label']}: {s['reason']}" for s in curve.skipped]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mpq_core.sensitivity_table import SensitivityTable
    from mpq_core.sweep import run_sweep, write_sweep

    marked = bool(getattr(args, "budgets", None))
    defaults = {} if marked else {"budgets": ["avg-bits=8"]}  # a spec needs one; not marked
    spec = spec_from_args(args, finetune={"epochs": 0}, **defaults)
    table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
    progress = progress_from_args(args)
    try:
        result = run_sweep(
            spec,
            args.model,
            args.data,
            eval_data=args.eval_data,
            sensitivity=table,
            mark_budgets=marked,
            progress=progress,
        )
    finally:
        progress.close()
    files = write_sweep(result, args.out_dir)
    print(format_curve(result.curve))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(sorted(files))} to {args.out_dir}")
    return 0
