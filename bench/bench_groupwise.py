"""Per-channel vs group-wise weight scales on the text LM, at 3 and 4 average bits.

Run: ``python -m bench.bench_groupwise``. Writes ``bench/results/groupwise.{json,md}``.

The TinyLM of ``bench/textlm.py`` (trained on stdlib docstrings; TorchScript), its 256
calibration and 512 test windows. For each scheme (one scale per output channel; one per group
of 128 input columns; one per group of 32, for a finer comparison, since the model is 128 wide
and a group of 128 only splits the 512-wide MLP down-projection) the Fisher table is computed
once at bits 2,3,4,5,6,8, allocated at ``avg-bits=3`` and ``avg-bits=4`` (the scheme's scales
count in its size, not in ``avg-bits``, which counts code bits only), quantized without
fine-tuning, and scored by test perplexity; the packed checkpoint is written and its size
recorded. Since group-wise scales cost bytes that ``avg-bits`` does not charge, the grouped
schemes are also allocated at a ``size`` budget equal to the per-channel checkpoint's bytes at
the same average bits (equal file size). One thread.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.textlm import perplexity, prepare_textlm
from mpq_core.allocation import allocate
from mpq_core.packed_checkpoint import save_packed_checkpoint
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.sensitivity import analyze
from mpq_core.spec import FinetuneSpec, Granularity, JobSpec

RESULTS = Path(__file__).resolve().parent / "results"
BITS = [2, 3, 4, 5, 6, 8]
AVG_BITS = (3, 4)
SCHEMES = ("channel", "128", "32")


def _spec(granularity: str, budget: str) -> JobSpec:
    return JobSpec(
        budgets=[budget],
        bits=list(BITS),
        granularity=Granularity(granularity),
        batch_size=32,
        finetune=FinetuneSpec(epochs=0),
    )


def _scheme_rows(lm: Any, granularity: str, sizes: dict[int, int]) -> list[dict[str, Any]]:
    """Rows at each average width, and at each size in ``sizes`` (avg bits -> bytes)."""
    model = lm.model
    floats = {n: p.detach().clone() for n, p in model.named_weights().items()}
    start = time.perf_counter()
    table = analyze(model, lm.calib, _spec(granularity, f"avg-bits={AVG_BITS[0]}"))
    analysis_s = time.perf_counter() - start
    rows = []
    budgets = [f"avg-bits={avg}" for avg in AVG_BITS] + [f"size={b}B" for b in sizes.values()]
    for budget in budgets:
        spec = _spec(granularity, budget)
        bits = allocate(table, spec).bits_by_layer()
        layers = quantize_weights(model, bits, scheme=spec.scheme)
        apply_weights(model, layers)
        ppl = perplexity(model, lm.test)
        with tempfile.TemporaryDirectory() as tmp:
            size = save_packed_checkpoint(Path(tmp), model, layers)
        with torch.no_grad():
            for n, p in model.named_weights().items():
                p.copy_(floats[n])
        grouped = sum(1 for layer in layers.values() if layer.scales.dim() > 1)
        rows.append(
            {
                "granularity": granularity,
                "budget": budget,
                "avg_bits": sum(bits[n] * floats[n].numel() for n in bits)
                / sum(floats[n].numel() for n in bits),
                "test_perplexity": ppl,
                "packed_bytes": size,
                "layers_grouped": grouped,
                "layers": len(layers),
                "analysis_seconds": analysis_s,
                "bits": bits,
            }
        )
        print(f"{granularity:>7} {budget}: perplexity {ppl:.3f}, packed {size:,} B")
    return rows


def main() -> dict[str, Any]:
    torch.set_num_threads(1)
    lm = prepare_textlm()
    rows = _scheme_rows(lm, SCHEMES[0], {})
    sizes = {avg: r["packed_bytes"] for avg, r in zip(AVG_BITS, rows, strict=True)}
    rows += [row for g in SCHEMES[1:] for row in _scheme_rows(lm, g, sizes)]
    result = {
        "schema_version": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": 1,
        "float_test_perplexity": lm.float_test_perplexity,
        "float_script_bytes": lm.script_path.stat().st_size,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "groupwise.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "groupwise.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Per-channel vs group-wise scales on the text LM",
        "",
        f"{r['date']}, torch {r['torch']}, one thread. Run: `python -m bench.bench_groupwise`.",
        f"Float test perplexity {r['float_test_perplexity']:.3f}; no fine-tuning. `avg-bits` "
        "counts code bits only; the `size` rows give the grouped schemes the per-channel "
        "checkpoint's bytes at the same average bits.",
        "",
        "| scales | budget | avg bits | test perplexity | packed bytes | layers grouped |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        label = "per channel" if row["granularity"] == "channel" else f"group {row['granularity']}"
        lines.append(
            f"| {label} | {row['budget']} | {row['avg_bits']:.3f} | {row['test_perplexity']:.3f} | "
            f"{row['packed_bytes']:,} | {row['layers_grouped']}/{row['layers']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
