"""End-to-end benchmark: allocation methods before and after the same fine-tuning.

Run: ``python -m bench.bench_pipeline``. Writes ``bench/results/pipeline.{json,md}``.

1. Digits CNN and MLP at average 2.5, 3 and 4 bits: test accuracy of uniform (where one width
   meets the budget exactly), random (mean of 3 allocations that fill the budget), hawq, kl and
   fisher allocations, each after plain post-training quantization and after the same
   fine-tuning (``FinetuneSpec(epochs=10, lr=1e-4)``, distillation + cross entropy, 10% of the
   calibration data held out to pick the epoch).
2. The same for the character-level transformer LM of ``bench/textlm.py`` (stdlib docstrings),
   scored by held-out perplexity at average 3 and 4 bits.
3. The packed checkpoint's size for the fisher allocations against float32 and the budget.
4. ``mpq quantize`` end to end on the LM (two inputs: int64 ids and a float mask) from its
   TorchScript file and from its ``.pt2`` file, through the real command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bench_sensitivity import WeightBank, random_fill
from bench.digits import accuracy, prepare
from bench.textlm import perplexity, prepare_textlm
from mpq_core.allocation import allocate_bits
from mpq_core.budgets import Budget, achieved, parse_budget
from mpq_core.data import CalibrationData
from mpq_core.finetune import finetune
from mpq_core.intake import LoadedModel
from mpq_core.packed_checkpoint import save_packed_checkpoint
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.sensitivity import compute_sensitivity
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import FinetuneSpec

BITS = [2, 3, 4, 5, 6, 8]
RESULTS = Path(__file__).resolve().parent / "results"
FINETUNE = FinetuneSpec(epochs=10, lr=1e-4, patience=3)
RANDOM_ALLOCATIONS = 3

Score = Callable[[LoadedModel, CalibrationData], float]


class Case:
    """One model with its data, float weights and score (higher-is-better flag)."""

    def __init__(
        self,
        name: str,
        model: LoadedModel,
        calib: CalibrationData,
        test: CalibrationData,
        score: Score,
        metric: str,
        higher_is_better: bool,
    ) -> None:
        self.name, self.model, self.calib, self.test = name, model, calib, test
        self.score, self.metric, self.higher_is_better = score, metric, higher_is_better
        self.float_weights = {n: p.detach().clone() for n, p in model.named_weights().items()}
        self.profile: ModelProfile = profile_model(model, calib)

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.model.named_weights().items():
                p.copy_(self.float_weights[n])

    def run(self, bits: dict[str, int]) -> dict[str, Any]:
        """Score after post-training quantization and after fine-tuning with ``bits``."""
        self.restore()
        layers = quantize_weights(self.model, bits)
        apply_weights(self.model, layers)
        before = self.score(self.model, self.test)
        self.restore()
        start = time.perf_counter()
        result = finetune(
            self.model, self.calib, bits, {n: q.scales for n, q in layers.items()}, FINETUNE
        )
        after = self.score(self.model, self.test)
        seconds = time.perf_counter() - start
        self.restore()
        return {
            "ptq": before,
            "finetuned": after,
            "best_epoch": result.best_epoch,
            "finetune_seconds": seconds,
        }


def _avg_bits(profile: ModelProfile, bits: dict[str, int]) -> float:
    total = sum(layer.params for layer in profile.layers)
    return sum(layer.params * bits[layer.name] for layer in profile.layers) / total


def _tables(case: Case, hawq_iterations: int) -> dict[str, SensitivityTable]:
    tables = {}
    for method in ("hawq", "kl", "fisher"):
        opts: dict[str, Any] = {"batch_size": 64}
        if method == "hawq":
            opts["iterations"] = hawq_iterations
        start = time.perf_counter()
        tables[method] = compute_sensitivity(
            method, case.model, case.calib, case.profile, BITS, **opts
        )
        print(f"  {method}: {time.perf_counter() - start:.1f} s", flush=True)
    return tables


def bench_case(case: Case, budgets: list[float], hawq_iterations: int, seed: int) -> dict[str, Any]:
    print(f"\n== {case.name}", flush=True)
    case.restore()
    float_score = case.score(case.model, case.test)
    tables = _tables(case, hawq_iterations)
    names = [layer.name for layer in case.profile.layers]
    bank = WeightBank(case.model, case.profile, BITS)
    rows: dict[str, Any] = {}
    sizes: dict[str, Any] = {}
    for budget in budgets:
        row: dict[str, Any] = {}
        if float(budget).is_integer() and int(budget) in BITS:
            bits = {n: int(budget) for n in names}
            row["uniform"] = {**case.run(bits), "avg_bits": float(budget)}
        rng = np.random.default_rng(seed)
        randoms = []
        for _ in range(RANDOM_ALLOCATIONS):
            alloc = random_fill(rng, bank, budget)
            bits = dict(zip(names, alloc, strict=True))
            randoms.append({**case.run(bits), "avg_bits": _avg_bits(case.profile, bits)})
        row["random"] = {
            "ptq": statistics.mean(r["ptq"] for r in randoms),
            "finetuned": statistics.mean(r["finetuned"] for r in randoms),
            "runs": randoms,
        }
        for method, table in tables.items():
            allocation = allocate_bits(table, [parse_budget(f"avg-bits={budget:g}")], bits=BITS)
            bits = allocation.bits_by_layer()
            row[method] = {
                **case.run(bits),
                "bits": bits,
                "avg_bits": _avg_bits(case.profile, bits),
            }
            if method == "fisher":
                sizes[f"{budget:g}"] = _sizes(case, bits)
        rows[f"{budget:g}"] = row
        print(
            f"  avg-bits={budget:g}: "
            + ", ".join(f"{k} {v['ptq']:.4f}->{v['finetuned']:.4f}" for k, v in row.items()),
            flush=True,
        )
    return {
        "metric": case.metric,
        "higher_is_better": case.higher_is_better,
        "float": float_score,
        "params": case.profile.total_params,
        "layers": len(names),
        "budgets": rows,
        "sizes": sizes,
    }


def _sizes(case: Case, bits: dict[str, int]) -> dict[str, float]:
    layers = case.profile.layers
    predicted = achieved(
        Budget("size", 1.0), layers, case.profile.float_params, [bits[x.name] for x in layers]
    )
    with tempfile.TemporaryDirectory() as tmp:
        case.restore()
        packed = save_packed_checkpoint(
            Path(tmp) / "m.mpq.safetensors", case.model, quantize_weights(case.model, bits)
        )
    return {
        "float32_bytes": 4 * case.profile.total_params,
        "predicted_bytes": predicted,
        "packed_bytes": packed,
        "over_prediction_pct": 100 * (packed / predicted - 1),
        "compression": 4 * case.profile.total_params / packed,
    }


def cli_end_to_end(paths: dict[str, Path], calib: Path, test: Path) -> dict[str, Any]:
    """``mpq quantize`` through the installed console script, from .pt and from .pt2."""
    exe = Path(sys.executable).with_name("mpq")
    out: dict[str, Any] = {}
    for fmt, model in paths.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                str(exe),
                "quantize",
                str(model),
                "--data",
                str(calib),
                "--eval-data",
                str(test),
                "--budget",
                "avg-bits=4",
                "--finetune.epochs",
                "2",
                "--out-dir",
                tmp,
                "--no-progress",
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - start
            entry: dict[str, Any] = {"returncode": proc.returncode, "seconds": seconds}
            if proc.returncode == 0:
                report = json.loads((Path(tmp) / "report.json").read_text())
                entry.update(
                    artifacts=report["artifacts"],
                    perplexity={
                        k: (v or {}).get("perplexity") for k, v in report["metrics"].items()
                    },
                    timings=report["timings"],
                )
            else:
                entry["stderr"] = proc.stderr[-2000:]
            out[fmt] = entry
            print(f"  mpq quantize {model.name}: rc {proc.returncode}, {seconds:.1f} s", flush=True)
    return out


def _cell(entry: dict[str, Any] | None, pct: bool) -> str:
    if entry is None:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(entry['ptq'])} → **{f(entry['finetuned'])}**"


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# End-to-end benchmark: allocation, post-training quantization, fine-tuning",
        "",
        f"Generated by `python -m bench.bench_pipeline` on {meta['date']}, {meta['machine']}, "
        f"torch {meta['torch']}, {meta['threads']} thread(s). Total {meta['seconds']:.0f} s. "
        f"Fine-tuning: {meta['finetune']}. Random: mean of {RANDOM_ALLOCATIONS} allocations "
        f"that fill the budget. HAWQ iterations: {meta['hawq_iterations']}.",
        "",
        "Each cell: after post-training quantization → **after fine-tuning**.",
        "",
    ]
    for name, r in results["models"].items():
        pct = r["metric"] == "accuracy"
        unit = "test accuracy %" if pct else "test perplexity (lower is better)"
        float_value = f"{100 * r['float']:.1f}" if pct else f"{r['float']:.3f}"
        lines += [
            f"## {name}: {unit}, float {float_value}",
            "",
            "| avg bits | uniform | random | hawq | kl | fisher | fisher bits |",
            "|---|---|---|---|---|---|---|",
        ]
        for budget, row in r["budgets"].items():
            cells = " | ".join(
                _cell(row.get(k), pct) for k in ("uniform", "random", "hawq", "kl", "fisher")
            )
            lines.append(
                f"| {budget} | {cells} | {'/'.join(str(b) for b in row['fisher']['bits'].values())} |"
            )
        lines.append("")
    lines += [
        "## Packed checkpoint size (fisher allocations)",
        "",
        "| model | avg bits | float32 B | predicted B | packed B | over prediction | compression |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        for budget, s in r["sizes"].items():
            lines.append(
                f"| {name} | {budget} | {s['float32_bytes']:,} | {s['predicted_bytes']:,.0f} | "
                f"{s['packed_bytes']:,} | {s['over_prediction_pct']:+.1f}% | {s['compression']:.1f}x |"
            )
    lines += [
        "",
        "## `mpq quantize` on the two-input LM",
        "",
        "| file | exit | seconds | perplexity float → quantized → fine-tuned |",
        "|---|---|---|---|",
    ]
    for fmt, e in results["cli"].items():
        ppl = e.get("perplexity") or {}
        text = (
            " → ".join(f"{ppl[k]:.3f}" for k in ("float", "quantized", "finetuned") if ppl.get(k))
            or e.get("stderr", "")[:200]
        )
        lines.append(f"| {fmt} | {e['returncode']} | {e['seconds']:.1f} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="cnn,mlp,textlm")
    parser.add_argument("--digits-hawq-iterations", type=int, default=200)
    parser.add_argument("--lm-hawq-iterations", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models: dict[str, Any] = {}
    cli: dict[str, Any] = {}
    wanted = args.models.split(",")
    for name in ("cnn", "mlp"):
        if name in wanted:
            p = prepare(name)  # type: ignore[arg-type]
            case = Case(f"digits {name}", p.model, p.calib, p.test, accuracy, "accuracy", True)
            models[case.name] = bench_case(
                case, [2.5, 3, 4], args.digits_hawq_iterations, args.seed
            )
    if "textlm" in wanted:
        lm = prepare_textlm()
        case = Case("text LM", lm.model, lm.calib, lm.test, perplexity, "perplexity", False)
        models[case.name] = bench_case(case, [3, 4], args.lm_hawq_iterations, args.seed)
        cli = cli_end_to_end(
            {"TorchScript (.pt)": lm.script_path, "torch.export (.pt2)": lm.export_path},
            lm.calib_path,
            lm.test_path,
        )
    results = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
            "torch": torch.__version__,
            "threads": args.threads,
            "finetune": json.dumps(asdict(FINETUNE)),
            "hawq_iterations": {
                "digits": args.digits_hawq_iterations,
                "lm": args.lm_hawq_iterations,
            },
            "seconds": time.perf_counter() - start,
        },
        "models": models,
        "cli": cli,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    markdown = to_markdown(results)
    (args.out / "pipeline.md").write_text(markdown)
    print("\n" + markdown)
    return results


if __name__ == "__main__":
    main()
