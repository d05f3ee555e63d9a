"""``mpq analyze``: per-layer, per-bit-width sensitivities, written as a table."""

from __future__ import annotations

import argparse
from typing import Any

from mpq_core.cli.inputs import add_input_arguments, load_inputs
from mpq_core.cli.progress_args import add_progress_arguments, progress_from_args
from mpq_core.cli.spec_args import add_spec_arguments, spec_values

__all__ = ["ANALYSIS_FIELDS", "add_parser", "run"]

#: The job spec fields that decide a sensitivity table (``analyze`` and ``quantize``).
ANALYSIS_FIELDS = (
    "analysis",
    "bits",
    "granularity",
    "symmetric",
    "batch_size",
    "seed",
    "output_key",
)


def add_parser(subparsers: Any) -> None:
    """Register the ``analyze`` subcommand."""
    p = subparsers.add_parser("analyze", help="per-layer, per-bit-width sensitivities")
    add_input_arguments(p)
    add_spec_arguments(p, (*ANALYSIS_FIELDS, "max_memory"))
    add_progress_arguments(p)
    p.add_argument("--out", required=True, metavar="SENS.json", help="where to write the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mpq_core.allocation import checkpoint_overhead
    from mpq_core.layers import transposed_names
    from mpq_core.memory_plan import plan_memory
    from mpq_core.packed_checkpoint import file_bytes_of
    from mpq_core.sensitivity import analyze
    from mpq_core.spec import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_BITS,
        AnalysisSpec,
        parse_max_memory,
        scheme_from,
    )

    values = spec_values(args)
    analysis = AnalysisSpec(**values.get("analysis", {}))  # a bad setting fails before loading
    scheme = scheme_from(values.get("granularity", "channel"), values.get("symmetric", True))
    limit = parse_max_memory(values.get("max_memory"))
    model, data = load_inputs(args.model, args.data)
    plan = plan_memory(
        model,
        data,
        batch_size=values.get("batch_size", DEFAULT_BATCH_SIZE),
        finetune_batch_size=None,
        bits=len(values.get("bits", DEFAULT_BITS)),
        max_memory=limit,
        device=torch.device("cpu"),
        output_key=values.get("output_key"),
    )
    if (note := plan.note()) is not None:
        print(f"note: {note}")
    progress = progress_from_args(args)
    try:
        table = analyze(
            model,
            data,
            analysis,
            bits=values.get("bits"),
            batch_size=plan.batch_size,
            seed=values.get("seed"),
            output_key=values.get("output_key"),
            progress=progress,
            scheme=scheme,
        )
    finally:
        progress.close()
    # The header bound, so `mpq allocate` holds size budgets on the written file.
    held_to = file_bytes_of(model, scheme, transposed_names(table.layers))
    table.checkpoint_overhead_bytes = checkpoint_overhead(table, held_to)
    table.save(args.out)
    width = max(len(layer.name) for layer in table.layers)
    print(
        f"{table.method} sensitivities of {len(table.layers)} layers on {data.num_samples} "
        f"samples in {table.meta['seconds']:.2f} s -> {args.out}"
    )
    print(f"{'layer':<{width}}  " + " ".join(f"{f'{b}-bit':>10}" for b in table.bits))
    for layer, row in zip(table.layers, table.omega, strict=True):
        print(f"{layer.name:<{width}}  " + " ".join(f"{v:>10.3g}" for v in row))
    return 0
