"""``mpq inspect``: the quantizable layers of a model, with their parameters and MACs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mpq_core.cli.inputs import add_input_arguments, load_inputs

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``inspect`` subcommand."""
    p = subparsers.add_parser("inspect", help="list the quantizable layers with params and MACs")
    add_input_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def run(args: argparse.Namespace) -> int:
    from mpq_core.profiling import profile_model

    model, data = load_inputs(args.model, args.data)
    profile = profile_model(model, data)
    if args.json:
        doc = {
            "schema_version": 1,
            "kind": "mpq.inspect",
            "model": {"format": model.format, "sha256": model.sha256},
            "layers": [layer.to_dict() for layer in profile.layers],
            "quantized_params": profile.quantized_params,
            "float_params": profile.float_params,
            "left_in_float": profile.left_in_float,
            "macs_per_sample": sum(layer.macs for layer in profile.layers),
        }
        print(json.dumps(doc, indent=2))
        return 0
    width = max(len(layer.name) for layer in profile.layers)
    print(
        f"{model.format} model, {len(profile.layers)} quantizable layers, sha256 {model.sha256[:12]}"
    )
    print(f"{'layer':<{width}}  {'kind':<10} {'shape':<18} {'params':>9} {'MACs/sample':>12}")
    for layer in profile.layers:
        shape = "x".join(map(str, layer.shape))
        print(
            f"{layer.name:<{width}}  {layer.kind:<10} {shape:<18} {layer.params:>9} {layer.macs:>12}"
        )
    macs = sum(layer.macs for layer in profile.layers)
    print(
        f"total: {profile.quantized_params} quantizable params ({_human(profile.quantized_params)}), "
        f"{profile.float_params} left in float, {macs} MACs/sample ({_human(macs)})"
    )
    for name, why in profile.left_in_float.items():
        print(f"left in float: {name}: {why}")
    return 0
