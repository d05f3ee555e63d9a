"""The ``mpq`` command line: ``inspect``, ``analyze``, ``allocate``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from mpq_core import cli_allocate, cli_quantize
from mpq_core.errors import MpqError, SpecError

__all__ = ["main"]


def _parse_bits(text: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError as exc:
        raise SpecError(f"--bits takes a comma-separated list like 2,3,4,8, got {text!r}") from exc
    if not bits:
        raise SpecError("--bits needs at least one bit width")
    return bits


def _load(model_path: str, data_path: str) -> tuple[Any, Any]:
    from mpq_core.data import load_data
    from mpq_core.intake import load_model
    from mpq_core.runner import check_data_fits

    model = load_model(model_path)
    data = load_data(data_path)
    check_data_fits(model, data)
    return model, data


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mpq_core.profiling import profile_model

    model, data = _load(args.model, args.data)
    profile = profile_model(model, data)
    if args.json:
        doc = {
            "schema_version": 1,
            "kind": "mpq.inspect",
            "model": {"format": model.format, "sha256": model.sha256},
            "layers": [layer.to_dict() for layer in profile.layers],
            "quantized_params": profile.quantized_params,
            "float_params": profile.float_params,
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
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from mpq_core.profiling import profile_model
    from mpq_core.progress import TerminalProgress
    from mpq_core.sensitivity import compute_sensitivity

    bits = _parse_bits(args.bits)
    model, data = _load(args.model, args.data)
    profile = profile_model(model, data)
    progress = TerminalProgress(enabled=None if not args.no_progress else False)
    options = analysis_options(args)
    try:
        table = compute_sensitivity(
            args.method, model, data, profile, bits, progress=progress, **options
        )
    finally:
        progress.close()
    table.save(args.out)
    width = max(len(layer.name) for layer in table.layers)
    print(
        f"{args.method} sensitivities of {len(table.layers)} layers on {data.num_samples} samples "
        f"in {table.meta['seconds']:.2f} s -> {args.out}"
    )
    print(f"{'layer':<{width}}  " + " ".join(f"{f'{b}-bit':>10}" for b in table.bits))
    for layer, row in zip(table.layers, table.omega, strict=True):
        print(f"{layer.name:<{width}}  " + " ".join(f"{v:>10.3g}" for v in row))
    return 0


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """The sensitivity options ``analyze`` and ``quantize`` share."""
    p.add_argument("--method", choices=["fisher", "kl", "hawq"], default="fisher")
    p.add_argument(
        "--bits", default="2,3,4,5,6,8", help="candidate bit widths (default 2,3,4,5,6,8)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--loss",
        choices=["auto", "ce", "mse"],
        default="auto",
        help="auto: cross entropy on class scores (with labels, or labels drawn from "
        "the model's own predictions), output-space Gauss-Newton otherwise",
    )
    p.add_argument("--iterations", type=int, default=200, help="Hutchinson iterations (hawq)")
    p.add_argument(
        "--first-order",
        action="store_true",
        help="fisher: add the gradient term the paper drops (helps when the calibration data "
        "is held out and the model is not at a minimum of its loss there)",
    )


def analysis_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword options for ``compute_sensitivity`` from parsed ``add_analysis_options``."""
    options: dict[str, Any] = {"batch_size": args.batch_size, "loss": args.loss}
    if args.method == "hawq":
        options["iterations"] = args.iterations
    if args.first_order:
        if args.method != "fisher":
            raise SpecError("--first-order applies to --method fisher only")
        options["first_order"] = True
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpq",
        description="Mixed-precision quantization: profile a model, score layer sensitivities, "
        "allocate bit widths under a budget.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the quantizable layers with params and MACs")
    p.add_argument("model", help="TorchScript archive (.pt) or torch.export program (.pt2)")
    p.add_argument("--data", required=True, help=".npz or .safetensors with 'input' (+ 'labels')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("analyze", help="per-layer, per-bit-width sensitivities")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    add_analysis_options(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="where to write SENS.json")
    p.set_defaults(func=_cmd_analyze)

    cli_allocate.add_parser(sub)
    cli_quantize.add_parser(sub)
    return parser


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    more_errors: dict[type[Exception], str] | None = None,
) -> int:
    """Parse ``argv`` with ``parser``, run the chosen command, and turn the errors a user can
    cause into ``mpq: error [code]: message`` and exit status 2 (never a traceback)."""
    warnings.filterwarnings("ignore", message=".*torch.jit.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MpqError as exc:
        print(f"mpq: error [{exc.code}]: {exc.message}", file=sys.stderr)
    except FileNotFoundError as exc:
        print(f"mpq: error [file_not_found]: {exc.filename}: no such file", file=sys.stderr)
    except tuple(more_errors or {}) as exc:
        code = next(c for t, c in (more_errors or {}).items() if isinstance(exc, t))
        print(f"mpq: error [{code}]: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the engine-only ``mpq`` command (``api.cli`` adds the service)."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
