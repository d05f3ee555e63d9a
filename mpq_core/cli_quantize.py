"""``mpq quantize``: the whole job from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run", "summary"]


def add_parser(subparsers: Any) -> None:
    """Register the ``quantize`` subcommand."""
    from mpq_core.cli import add_analysis_options
    from mpq_core.cli_allocate import add_budget_options

    p = subparsers.add_parser(
        "quantize",
        help="analyze, allocate, fine-tune, evaluate and export a quantized model",
        description=(
            "Run the whole job: profile the model, score its layers, choose bits within every "
            "--budget, fine-tune with the allocated bits, evaluate before and after, and write "
            "model.pt/model.pt2, model.mpq.safetensors, allocation.json, sensitivity.json, "
            "report.json (and encodings.json with --quantize-activations) into --out-dir."
        ),
    )
    p.add_argument("model", help="TorchScript archive (.pt) or torch.export program (.pt2)")
    p.add_argument("--data", required=True, help="calibration data (.npz or .safetensors)")
    p.add_argument(
        "--eval-data", help="evaluation data; default: hold out --eval-fraction of --data"
    )
    p.add_argument("--out-dir", required=True)
    add_budget_options(p)
    add_analysis_options(p)
    p.add_argument(
        "--quantize-activations",
        action="store_true",
        help="also fake-quantize the inputs of quantized layers at --act-bits (per tensor)",
    )
    p.add_argument("--sensitivity", metavar="SENS.json", help="reuse a stored table for this model")
    p.add_argument("--finetune-epochs", type=int, default=5, help="0 skips fine-tuning (5)")
    p.add_argument("--finetune-steps", type=int, help="optimiser steps instead of epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (1e-4)")
    p.add_argument("--finetune-batch-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out to pick the epoch")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    p.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> Any:
    from mpq_core.budgets import load_cost_table
    from mpq_core.cli import _parse_bits, analysis_options
    from mpq_core.cli_allocate import parse_pins
    from mpq_core.spec import AnalysisSpec, FinetuneSpec, JobSpec

    analysis_options(args)  # validates --first-order against --method
    cost_table = None
    if args.cost_table:
        cost_table = {
            name: {str(b): c for b, c in row.items()}
            for name, row in load_cost_table(args.cost_table).items()
        }
    return JobSpec(
        budgets=list(args.budget),
        bits=_parse_bits(args.bits),
        pins=parse_pins(args.pin),
        ties=list(args.tie),
        solver=args.solver,
        act_bits=args.act_bits,
        quantize_activations=args.quantize_activations,
        cost_table=cost_table,
        analysis=AnalysisSpec(
            method=args.method,
            loss=args.loss,
            first_order=args.first_order,
            hawq_iterations=args.iterations,
        ),
        finetune=FinetuneSpec(
            epochs=args.finetune_epochs,
            steps=args.finetune_steps,
            lr=args.lr,
            batch_size=args.finetune_batch_size,
            val_fraction=args.val_fraction,
            patience=args.patience,
        ),
        batch_size=args.batch_size,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        device=args.device,
    )


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
        f"float32 {sizes['float32_bytes']:,} B)"
    )
    rise = report["measured_loss_increase"]
    lines.append(
        f"loss increase: predicted {report['predicted_loss_increase']:.4g}, measured "
        f"{rise['calibration']:.4g} (calibration) / {rise['eval']:.4g} (eval)"
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
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mpq_core.pipeline import quantize_model
    from mpq_core.progress import TerminalProgress
    from mpq_core.sensitivity_table import SensitivityTable

    spec = _spec(args)
    table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
    progress = TerminalProgress(enabled=False if args.no_progress else None)
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
