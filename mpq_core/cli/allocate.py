"""``mpq allocate``: solve a stored sensitivity table for one or more budgets."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpq_core.allocation import Allocation, allocate
from mpq_core.budgets import format_value
from mpq_core.cli.spec_args import add_spec_arguments, spec_from_args
from mpq_core.sensitivity_table import SensitivityTable

__all__ = ["BUDGET_FIELDS", "add_parser", "format_allocation", "run"]

#: The job spec fields of a budget and its constraints (``allocate`` and ``quantize``).
BUDGET_FIELDS = ("budgets", "bits", "pins", "ties", "solver", "act_bits", "cost_table")


def add_parser(subparsers: Any) -> None:
    """Register the ``allocate`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "allocate",
        help="choose per-layer bit widths for a budget from a sensitivity table",
        description=(
            "Choose a bit width per layer that minimises the predicted loss increase while "
            "meeting every --budgets. Regexes for --pins and --ties match the whole layer name. "
            "Without --bits, the table's bit widths are the candidates."
        ),
    )
    p.add_argument("sensitivity", metavar="SENS.json", help="table written by `mpq analyze`")
    add_spec_arguments(
        p, BUDGET_FIELDS, required=["budgets"], defaults={"bits": "the table's bit widths"}
    )
    p.add_argument("--out", required=True, metavar="ALLOC.json", help="where to write it")
    p.add_argument("--json", action="store_true", help="print the allocation as JSON")
    p.set_defaults(func=run)


def format_allocation(alloc: Allocation) -> str:
    """A short human table: layer, params, bits, omega at the chosen bits; then the budgets."""
    width = max([len("layer")] + [len(la.name) for la in alloc.layers])
    lines = [f"{'layer':<{width}}  {'params':>12}  {'bits':>4}  {'omega':>11}"]
    for la in alloc.layers:
        lines.append(
            f"{la.name:<{width}}  {la.params:>12,}  {la.bits:>4}  {la.omega[la.bits]:>11.4g}"
        )
    lines.append(f"predicted loss increase: {alloc.predicted_loss_increase:.6g}")
    for rep in alloc.budgets:
        got = format_value(rep.budget.kind, rep.achieved)
        lines.append(f"budget {rep.budget.label()}: achieved {got}")
    lines.append(f"solver: {alloc.solver} ({alloc.solve_seconds * 1e3:.1f} ms)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``mpq allocate``; errors are :class:`mpq_core.errors.MpqError` for ``main``."""
    table = SensitivityTable.load(args.sensitivity)
    alloc = allocate(table, spec_from_args(args, bits=table.bits))
    alloc.save(args.out)
    if args.json:
        print(json.dumps(alloc.to_dict(), indent=2))
    else:
        print(format_allocation(alloc))
        print(f"wrote {args.out}")
    return 0
