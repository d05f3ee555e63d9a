"""``mpq allocate``: solve a stored sensitivity table for one or more budgets."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpq_core.allocation import Allocation, allocate_bits
from mpq_core.budgets import format_value, parse_budget
from mpq_core.errors import SpecError
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.solvers import SOLVERS

__all__ = ["add_budget_options", "add_parser", "format_allocation", "parse_pins", "run"]


def _bit_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected bit widths like 2,3,4, got {text!r}") from exc


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """The budget and constraint options ``allocate`` and ``quantize`` share."""
    p.add_argument(
        "--budget",
        action="append",
        required=True,
        metavar="KIND=VALUE",
        help="avg-bits=3, size=1.5MB, compression=8x, bitops=1.2G, table=VALUE (repeatable)",
    )
    p.add_argument("--act-bits", type=int, default=8, help="activation bits for bitops (8)")
    p.add_argument("--cost-table", metavar="FILE", help="per-layer per-bit costs for table=")
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="REGEX=BITS",
        help="fix the layers matching REGEX at BITS (repeatable)",
    )
    p.add_argument(
        "--tie",
        action="append",
        default=[],
        metavar="REGEX",
        help="give all layers matching REGEX one shared bit width (repeatable)",
    )
    p.add_argument("--solver", choices=SOLVERS, default="auto")


def add_parser(subparsers: Any) -> None:
    """Register the ``allocate`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "allocate",
        help="choose per-layer bit widths for a budget from a sensitivity table",
        description=(
            "Choose a bit width per layer that minimises the predicted loss increase while "
            "meeting every --budget. Regexes for --pin and --tie match the whole layer name."
        ),
    )
    p.add_argument("sensitivity", metavar="SENS.json", help="table written by `mpq analyze`")
    add_budget_options(p)
    p.add_argument("--bits", type=_bit_list, help="candidate bit widths, e.g. 2,3,4,8")
    p.add_argument("--out", required=True, metavar="ALLOC.json", help="where to write it")
    p.add_argument("--json", action="store_true", help="print the allocation as JSON")
    p.set_defaults(func=run)


def parse_pins(items: list[str]) -> dict[str, int]:
    pins: dict[str, int] = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern:
            raise SpecError(f"--pin needs REGEX=BITS, got {item!r}")
        try:
            pins[pattern] = int(bits)
        except ValueError as exc:
            raise SpecError(f"--pin {item!r}: {bits!r} is not a bit width") from exc
    return pins


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
    budgets = [
        parse_budget(text, act_bits=args.act_bits, table_path=args.cost_table)
        for text in args.budget
    ]
    alloc = allocate_bits(
        table,
        budgets,
        bits=args.bits,
        pins=parse_pins(args.pin),
        ties=args.tie,
        solver=args.solver,
    )
    alloc.save(args.out)
    if args.json:
        print(json.dumps(alloc.to_dict(), indent=2))
    else:
        print(format_allocation(alloc))
        print(f"wrote {args.out}")
    return 0
