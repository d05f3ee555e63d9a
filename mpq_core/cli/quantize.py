"""``mpq quantize``: the whole job from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from mpq_core.cli.inputs import add_job_arguments
from mpq_core.cli.progress_args import add_progress_arguments, progress_from_args
from mpq_core.cli.spec_args import add_spec_arguments, spec_from_args
from mpq_core.spec import JobSpec

__all__ = ["add_parser", "run", "summary"]


def add_parser(subparsers: Any) -> None:
    """Register the ``quantize`` subcommand: every job spec field is a flag."""
    p = subparsers.add_parser(
        "quantize",
        help="analyze, allocate, fine-tune, evaluate and export a quantized model",
        description=(
            "Run the whole job: profile the model, score its layers, choose bits within every "
            "--budgets, fine-tune with the allocated bits, evaluate before and after, and write "
            "model.pt/model.pt2, model.mpq.safetensors, allocation.json, sensitivity.json, "
            "report.json (and encodings.json with --quantize-activations) into --out-dir. "
            "The flags are the job spec's JSON fields (finetune.lr is --finetune.lr)."
        ),
    )
    add_job_arguments(p)
    add_spec_arguments(p, [f.name for f in fields(JobSpec)], required=["budgets"])
    add_progress_arguments(p)
    p.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    p.set_defaults(func=run)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary(report: dict[str, Any]) -> str:
    """The closing table: layers and bits, budgets achieved, metrics before and after."""
    lines = []
    bits = report["allocation"]
    width = max(len(n) for n in bits)
    lines.append(f"{'layer':<{width}}  bits")
    lines += [f"{name:<{width}}  {b:>4}" for name, b in bits.items()]
    for rep in report["budgets"]:
        lines.append(f"budget {rep['label']}: achieved {rep['achieved']:.4g}")
    sizes = report["sizes"]
    lines.append(
        f"size: {sizes['packed_checkpoint_bytes']:,} B packed (predicted {sizes['predicted_bytes']:,.0f} B, "
        f"model {sizes['model_bytes']:,} B {'/'.join(sizes['model_dtypes'])})"
    )
    rise = report["measured_loss_increase"]
    lines.append(
        f"loss increase {report['loss_unit']}: predicted "
        f"{report['predicted_metric_loss_increase']:.4g}, measured "
        f"{rise['calibration']:.4g} (calibration) / {rise['eval']:.4g} (eval)"
        + (
            f"; measured/predicted {report['measured_over_predicted']:.2f}"
            if report.get("measured_over_predicted") is not None
            else ""
        )
    )
    m = report["metrics"]
    cols = ["float", "quantized", "finetuned"]
    lines.append(f"{'':<12}" + "".join(f"{c:>12}" for c in cols))
    for key in ("accuracy", "loss", "perplexity", "cosine", "sqnr_db"):
        row = [m[c][key] if m[c] is not None else None for c in cols]
        if all(v is None for v in row):
            continue
        lines.append(f"{key:<12}" + "".join(f"{_fmt(v):>12}" for v in row))
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
    lines += [_export_line(name, entry) for name, entry in (report.get("exports") or {}).items()]
    lines += [f"note: {note}" for note in report.get("notes") or []]
    return "\n".join(lines)


def _export_line(name: str, entry: dict[str, Any]) -> str:
    """One runtime export: how close it runs to the simulated model, or why it was not written."""
    if not entry.get("written"):
        return f"{name}: not written: {entry.get('reason')}"
    diff = entry.get("max_abs_difference")
    where = "onnxruntime" if name.endswith(".onnx") else "torch"
    said = f"{diff:.3g} from the simulated model in {where}"
    if not isinstance(diff, int | float):
        said = str(diff) if diff is not None else f"{where} not installed: not run"
    extra = ""
    if "quantized_layers" in entry:
        extra = f", {entry['quantized_layers']} layers as integers, batch {entry['batch']}"
    return f"{name}: {said}{extra}"


def run(args: argparse.Namespace) -> int:
    from mpq_core.pipeline import quantize_model
    from mpq_core.sensitivity_table import SensitivityTable

    spec = spec_from_args(args)
    table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
    progress = progress_from_args(args)
    try:
        result = quantize_model(
            args.model,
            args.data,
            spec,
            args.out_dir,
            eval_source=args.eval_data,
            sensitivity=table,
            progress=progress,
        )
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.report, indent=2, allow_nan=False))
    else:
        print(summary(result.report))
        print(f"wrote {', '.join(sorted(result.artifacts))} to {result.out_dir}")
    return 0
