"""A projection, not a measurement: memory and time of 1B and 7B decoders on one H200.

Run: ``python -m bench.project_gpu`` (``--render``: only refresh the Fisher ratio from
``scale.json``). Writes ``bench/results/gpu_projection.{json,md}``.

No GPU was lent to the sessions that built issue 10, so this script projects from what this
CPU machine can measure exactly. Memory: a job's footprint is its weights, the copies its
stages keep (``mpq_core.memory_plan``'s counts: weight gradients in the analysis; the float
weights, master weights, Adam's two moments, gradients and best state in fine-tuning), one layer's
quantization errors, and one batch's autograd graph. The graph is measured, not guessed: the
plan's own ``measure_sample`` on GPT-2-style decoders of the target width with 1 and 2 blocks, on
the CPU (saved tensors are the same bytes on any device), extrapolated linearly in the number of
blocks, and halved for bf16 (measured in float32: this CPU runs bf16 matrix products in
software, minutes per pass at 4096 wide; a bf16 graph saves the same tensors at half the bytes). Time: one forward and backward pass costs about 6 x parameters x tokens
floating-point operations; the projection assumes 40% of the H200's 989 dense bf16 TFLOPS, and
takes the Fisher analysis's cost ratio to one forward and backward pass from the CPU benchmark
(``bench/results/scale.json``), where one is recorded.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 128
H200_BYTES = 141 * 10**9
H200_BF16_FLOPS = 989e12
MFU = 0.4  # assumed share of peak a fused bf16 transformer step reaches
BITS = 6  # candidate widths scored


@dataclass(frozen=True)
class Decoder:
    name: str
    width: int
    blocks: int
    heads: int
    vocab: int = 50257

    @property
    def params(self) -> int:
        # 12 d^2 per block (attention 4 d^2, MLP 8 d^2), tied token table, learned positions.
        return 12 * self.blocks * self.width**2 + (self.vocab + TOKENS) * self.width


SIZES = [Decoder("1B", 2048, 20, 16), Decoder("7B", 4096, 32, 32)]


def _slice_cost(size: Decoder, blocks: int) -> Any:
    """What one sample's graph costs (the plan's ``measure_sample``) in the decoder cut to
    ``blocks`` blocks, in float32; measured once for every stage (a 7B slice holds gigabytes)."""
    import gc

    from bench.decoders import DecoderConfig, traced_decoder
    from mpq_core.data import CalibrationData
    from mpq_core.intake import load_model
    from mpq_core.memory_plan import measure_sample

    cfg = DecoderConfig(size.vocab, size.width, blocks, size.heads, TOKENS)
    archive, _ = traced_decoder(cfg, tokens=TOKENS)
    ids = torch.randint(0, size.vocab, (2, TOKENS))
    cost = measure_sample(load_model(archive), CalibrationData(inputs=[ids]))
    del archive
    gc.collect()  # the traced slice before the next one is built
    return cost


def _fisher_ratio() -> tuple[float | None, str]:
    """The analysis's time over one forward+backward pass on the largest decoder measured by
    ``bench_scale`` (both stages recorded for the same sequences)."""
    path = RESULTS / "scale.json"
    if not path.exists():
        return None, "no CPU measurement"
    found = []
    for run in json.loads(path.read_text()).get("runs", {}).values():
        stages = run.get("stages", {})
        fwdbwd, analyze = (stages.get(k, {}).get("seconds") for k in ("fwdbwd", "analyze"))
        if fwdbwd and analyze:
            found.append((run.get("params", 0), analyze / fwdbwd, run.get("size", "?")))
    if not found:
        return None, "no CPU measurement"
    _, ratio, size = max(found)  # the largest model measured is the closest to these
    return round(ratio, 2), f"CPU, {size} decoder (bench/results/scale.json)"


def _with_fisher(row: dict[str, Any]) -> dict[str, Any]:
    ratio, ratio_from = _fisher_ratio()
    analyze = None if ratio is None else row["fwdbwd_s_per_1024_sequences"] * ratio
    return {
        **row,
        "fisher_x": ratio,
        "fisher_x_from": ratio_from,
        "analyze_s_per_1024_sequences": analyze,
    }


def project(size: Decoder) -> dict[str, Any]:
    from mpq_core import memory_plan as plan

    one, two = _slice_cost(size, 1), _slice_cost(size, 2)

    def per_sample_of(stage: str) -> int:
        a, b = one.bytes_for(stage), two.bytes_for(stage)
        return (a + (size.blocks - 1) * (b - a)) // 2  # float32 -> bf16

    per_sample, per_tuned = per_sample_of("analysis"), per_sample_of("finetune")

    weights = 2 * size.params  # bf16
    largest = size.vocab * size.width
    # One layer's errors at every width in bfloat16 (Fisher contracts a bfloat16 model in
    # it), and the float32 rows they are rebuilt from.
    errors = BITS * largest * 2 + 2 * largest * 4
    runtime = 2 * 10**9  # CUDA context and PyTorch's own allocations
    analysis_fixed = runtime + (1 + plan._MODEL_COPIES["analysis"]) * weights + errors
    # The model and the copies fine-tuning keeps (the plan's count, several epochs), its int8
    # codes, and the largest layer's float32 temporaries.
    copies = 1 + plan._MODEL_COPIES["finetune"] + plan._BEST_STATE
    finetune_fixed = (
        runtime + copies * weights + size.params + plan._FINETUNE_LAYER_COPIES * largest * 4
    )
    fwdbwd_s_per_seq = 6 * size.params * TOKENS / (MFU * H200_BF16_FLOPS)
    return _with_fisher(
        {
            "model": size.name,
            "params": size.params,
            "width": size.width,
            "blocks": size.blocks,
            "per_sample_gib": per_sample / 2**30,
            "weights_gib": weights / 2**30,
            "analysis_batch_on_h200": int((H200_BYTES - analysis_fixed) // per_sample),
            "analysis_gib_at_batch_16": (analysis_fixed + 16 * per_sample) / 2**30,
            "finetune_batch_on_h200": max(0, int((H200_BYTES - finetune_fixed) // per_tuned)),
            "finetune_gib_at_batch_8": (finetune_fixed + 8 * per_tuned) / 2**30,
            "fwdbwd_s_per_1024_sequences": 1024 * fwdbwd_s_per_seq,
        }
    )


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | graph / sequence | weights (bf16) | analysis batch that fits "
        "| analysis at batch 16 | fine-tuning batch that fits | fine-tuning at batch 8 "
        "| fwd+bwd, 1024 seq | analyze, 1024 seq |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        analyze = r["analyze_s_per_1024_sequences"]
        fisher = "-" if analyze is None else f"{analyze:.1f} s ({r['fisher_x']:.1f}x)"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['per_sample_gib'] * 1024:.0f} MiB "
            f"| {r['weights_gib']:.1f} GiB | {r['analysis_batch_on_h200']} "
            f"| {r['analysis_gib_at_batch_16']:.1f} GiB | {r['finetune_batch_on_h200']} "
            f"| {r['finetune_gib_at_batch_8']:.1f} GiB "
            f"| {r['fwdbwd_s_per_1024_sequences']:.1f} s "
            f"| {fisher} |"
        )
    return "\n".join(lines)


def main() -> dict[str, Any]:
    """Project every size; with ``--render``, only redo the Fisher columns of the rows already
    in ``gpu_projection.json`` from the latest ``scale.json`` (no model is built)."""
    torch.manual_seed(0)
    saved = RESULTS / "gpu_projection.json"
    if "--render" in sys.argv and saved.exists():
        rows = [_with_fisher(row) for row in json.loads(saved.read_text())["rows"]]
    else:
        rows = [project(size) for size in SIZES]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result = {
        "kind": "projection (no GPU measured)",
        "when": when,
        "assumptions": {
            "gpu_bytes": H200_BYTES,
            "bf16_flops": H200_BF16_FLOPS,
            "mfu": MFU,
            "tokens": TOKENS,
            "candidate_bits": BITS,
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_projection.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        "# 1B and 7B decoders on one H200: a projection\n\n"
        f"Generated by `python -m bench.project_gpu` on {when}. **Projected, not measured**: "
        "no GPU was available. Graph bytes per sequence of "
        f"{TOKENS} tokens measured on this CPU with mpq's own memory plan (1- and 2-block "
        "slices at full width in float32, extrapolated in blocks, halved for bf16); time from 6 x params x tokens "
        f"FLOPs at {MFU:.0%} of {H200_BF16_FLOPS / 1e12:.0f} TFLOPS, times the Fisher cost "
        "ratio measured on the CPU.\n\n" + _table(rows) + "\n"
    )
    (RESULTS / "gpu_projection.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
