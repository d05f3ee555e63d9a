"""The zoo table: every real architecture of the test zoo (tests/real_zoo.py), traced to
TorchScript and exported with torch.export, through the engine.

Per model and format:

- layers found by profiling / weight matrices of the eager module (the rest stay in float, with
  the reason from tests/mpq_core/test_zoo.py);
- the Fisher analysis' time as a multiple of one forward+backward pass over the same
  calibration data, measured in the same process right before it (a ratio, not seconds: the
  machine is shared);
- the largest relative difference of Omega from the one-backward-per-sample reference;
- output cosine with the float model on held-out inputs, at an average of 4 bits: every layer
  at 4 bits (uniform) against the Fisher and the KL allocations (candidate bits 2..8);
- the outcome: ``ok``, or the error code the job was refused with.

``python -m bench.bench_zoo`` writes ``bench/results/zoo.{md,json}``. Random weights and tiny
configs (nothing is downloaded), so cosines say how well each allocation keeps the model's
function, not task accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mpq_core import AnalysisSpec, JobSpec, allocate, analyze, load_model, profile_model
from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.errors import MpqError
from mpq_core.intake import LoadedModel, select_output
from mpq_core.losses import PerSampleLoss, resolve_loss_kind
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.runner import check_data_fits, iter_batches
from mpq_core.sensitivity.fisher import fisher_sensitivity
from tests.conftest import save_bytes
from tests.mpq_core.test_fisher import reference_omega
from tests.mpq_core.test_zoo import LEFT_IN_FLOAT
from tests.real_zoo import ZOO, build

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("trace", "export")
CALIB, TEST, BATCH = 32, 32, 8
REFERENCE_SAMPLES = 6
BITS = [2, 3, 4, 5, 6, 8]


def _forward_backward_seconds(model: LoadedModel, data: CalibrationData) -> float:
    """One pass of forward and backward (to the weights) over ``data``: the cost unit."""
    weights = list(model.named_weights().values())
    flags = [w.requires_grad for w in weights]
    start = time.perf_counter()
    try:
        for w in weights:
            w.requires_grad_(True)
        with capture_context():
            for batch in iter_batches(model, data, BATCH):
                out = select_output(model(*batch.inputs))
                loss = PerSampleLoss(resolve_loss_kind("auto", out))
                total = loss(out, loss.targets(out, batch.labels, batch.start)).sum()
                torch.autograd.grad(total, weights, allow_unused=True)
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return time.perf_counter() - start


def _cosine(model: LoadedModel, data: CalibrationData, reference: torch.Tensor) -> float:
    with torch.no_grad(), capture_context():
        out = torch.cat(
            [select_output(model(*b.inputs))[: b.valid] for b in iter_batches(model, data, BATCH)]
        )
    a, b = out.float().reshape(len(out), -1), reference.float().reshape(len(out), -1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def _cosine_at(
    model: LoadedModel, bits: dict[str, int], test: CalibrationData, reference: torch.Tensor
) -> float:
    weights = model.named_weights()
    saved = {name: weights[name].detach().clone() for name in bits}
    try:
        apply_weights(model, quantize_weights(model, bits))
        return _cosine(model, test, reference)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                weights[name].copy_(value)


def bench_entry(name: str, fmt: str) -> dict[str, Any]:
    entry = build(name)
    row: dict[str, Any] = {"model": name, "format": fmt, "exercises": entry.exercises}
    try:
        model = load_model(save_bytes(entry.module, tuple(entry.inputs(2, 0)), fmt))
        g = torch.Generator().manual_seed(5)
        labels = torch.randint(0, entry.classes, (CALIB,), generator=g) if entry.classes else None
        calib = CalibrationData(entry.inputs(CALIB, 1), labels)
        test = CalibrationData(entry.inputs(TEST, 2), None)
        check_data_fits(model, calib)
        profile = profile_model(model, calib)
    except MpqError as exc:
        return {**row, "outcome": exc.code, "message": exc.message}
    eager = {n for n, p in entry.module.named_parameters() if p.dim() >= 2}
    row["layers_found"] = len(profile.layers)
    row["layers_expected"] = len(eager - set(LEFT_IN_FLOAT))
    _forward_backward_seconds(model, calib)  # warm-up: TorchScript profiles its first runs
    unit = min(_forward_backward_seconds(model, calib) for _ in range(2))
    tables = {}
    for method in ("fisher", "kl"):
        spec = JobSpec(
            budgets=["avg-bits=4"], bits=BITS, batch_size=BATCH, analysis=AnalysisSpec(method)
        )
        # Warm, like the unit: TorchScript profiles the first runs of every new call pattern.
        analyze(model, calib.subset(slice(0, BATCH)), spec, profile=profile)
        start = time.perf_counter()
        tables[method] = analyze(model, calib, spec, profile=profile)
        row[f"{method}_cost_x"] = round((time.perf_counter() - start) / unit, 2)
    few = calib.subset(slice(0, REFERENCE_SAMPLES))
    got = torch.tensor(fisher_sensitivity(model, few, profile, BITS, batch_size=3))
    want = reference_omega(model, few, profile, BITS, batch_size=3)
    row["fisher_vs_reference"] = float(((got.double() - want).abs() / want.clamp_min(1e-30)).max())
    with torch.no_grad(), capture_context():
        reference = torch.cat(
            [select_output(model(*b.inputs))[: b.valid] for b in iter_batches(model, test, BATCH)]
        )
    uniform = {layer.name: 4 for layer in profile.layers}
    row["cosine_uniform4"] = _cosine_at(model, uniform, test, reference)
    for method, table in tables.items():
        spec = JobSpec(budgets=["avg-bits=4"], bits=BITS)
        alloc = allocate(table, spec)
        row[f"cosine_{method}"] = _cosine_at(model, alloc.bits_by_layer(), test, reference)
    row["outcome"] = "ok"
    return row


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 else f"{value:.1e}"
    return str(value)


def _err(cosine: float | None) -> str:
    return "-" if cosine is None else f"{max(0.0, 1.0 - cosine):.1e}"


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Zoo: real architectures through the engine",
        "",
        f"{meta['python']} / torch {meta['torch']} on {meta['machine']}; {CALIB} calibration "
        f"samples, {TEST} held-out, batch {BATCH}; `python -m bench.bench_zoo`.",
        "Cost: analysis time over one forward+backward pass on the same data (same run).",
        "Output error: 1 - mean output cosine with the float model at an average of 4 bits "
        "(lower is better): every layer at 4 bits, or the Fisher / KL allocation.",
        "",
        "| model | format | layers | fisher cost | kl cost | fisher vs reference | "
        "error uniform 4 | error fisher | error kl | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layers = f"{r.get('layers_found', '-')}/{r.get('layers_expected', '-')}"
        lines.append(
            f"| {r['model']} | {r['format']} | {layers} | {_fmt(r.get('fisher_cost_x'), 1)}x | "
            f"{_fmt(r.get('kl_cost_x'), 1)}x | {_fmt(r.get('fisher_vs_reference'))} | "
            f"{_err(r.get('cosine_uniform4'))} | {_err(r.get('cosine_fisher'))} | "
            f"{_err(r.get('cosine_kl'))} | {r['outcome']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_zoo", description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(ZOO), help="zoo entries to run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    bench_entry("tied_lm", "trace")  # warm-up: one-time costs of the first analysis in a process
    rows = []
    for name in args.models:
        for fmt in FORMATS:
            row = bench_entry(name, fmt)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "calibration_samples": CALIB,
        "test_samples": TEST,
        "batch_size": BATCH,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "zoo.md").write_text(to_markdown(rows, meta))
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
