"""Peak memory of the quantize stage's scoring: does it grow with the number of samples?

Run: ``python -m bench.bench_eval_memory [--baseline DIR]``. Writes
``bench/results/eval_memory.{json,md}``.

A GPT-2-style decoder with GPT-2's vocabulary built locally with random weights (Hugging Face
``GPT2LMHeadModel``: 50,257 tokens, 64 wide, 2 blocks), traced to TorchScript; its scores are
sequences x 128 positions x 50,257 floats, 206 MB per 8 sequences. Each measurement runs in a
fresh process: intake (``prepare_job``, 20% of the sequences held out for evaluation), then the
peak resident memory is reset (``/proc/self/clear_refs``) and ``quantize_stage`` scores the
float and the 4-bit model on both splits, batch 8; its peak (``VmHWM``) above the memory held
before it is reported. ``--baseline DIR`` measures the ``mpq_core`` under ``DIR`` too (e.g. an
export of main), with the same script. A child whose address space passes ``CAP_GIB`` fails
rather than pushing a shared machine into swap or the OOM killer; it is reported as over it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
VOCAB, WIDTH, LAYERS, HEADS, TOKENS, BATCH, BITS = 50257, 64, 2, 2, 128, 8, 4
SEQUENCES = (8, 16, 64)
CAP_GIB = 8


def _status_mib(field: str) -> int:
    from mpq_core.memory_plan import status_bytes

    value = status_bytes(field)
    return -1 if value is None else value // 2**20


def _write_decoder(path: Path) -> int:
    """Trace the decoder to TorchScript at ``path``; its parameter count."""
    from bench.decoders import DecoderConfig, traced_decoder

    archive, params = traced_decoder(DecoderConfig(VOCAB, WIDTH, LAYERS, HEADS, TOKENS))
    path.write_bytes(archive)
    return params


def _child(archive: Path, sequences: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process: the quantize stage's peak memory."""
    import torch

    from mpq_core.data import CalibrationData
    from mpq_core.intake import load_model
    from mpq_core.pipeline import prepare_job, quantize_stage
    from mpq_core.progress import StageClock, null_progress
    from mpq_core.spec import FinetuneSpec, JobSpec

    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (sequences, TOKENS))
    spec = JobSpec(
        budgets=[f"avg-bits={BITS}"], batch_size=BATCH, device="cpu", finetune=FinetuneSpec()
    )
    model = load_model(archive)
    ctx = prepare_job(spec, model, CalibrationData([ids]), None, StageClock(null_progress))
    bits = {n: BITS for n, p in model.named_weights().items() if p.dim() == 2}
    held = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current VmRSS
    quant = quantize_stage(ctx, bits)
    peak = _status_mib("VmHWM")
    return {
        "sequences": sequences,
        "eval_sequences": ctx.test.num_samples,
        "rss_before_stage_mib": held,
        "peak_mib": peak,
        "stage_peak_above_before_mib": peak - held,
        "quantized_eval_cosine": quant.scores.quantized_eval.cosine,
    }


def _measure(code: Path, archive: Path, sequences: int) -> dict[str, Any]:
    """Run :func:`_child` in a fresh interpreter importing ``mpq_core`` from ``code``."""
    cap = CAP_GIB << 30
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(archive), str(sequences)],
        env={**os.environ, "PYTHONPATH": str(code)},
        cwd=str(code),
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)),
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"sequences": sequences, "failed": f"over {CAP_GIB} GiB or failed: {tail}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _row(label: str, r: dict[str, Any]) -> str:
    if "failed" in r:
        return f"| {label} | {r['sequences']} | - | - | {r['failed']} |\n"
    return (
        f"| {label} | {r['sequences']} | {r['rss_before_stage_mib']} | {r['peak_mib']} "
        f"| {r['stage_peak_above_before_mib']} |\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a tree whose mpq_core to measure too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "decoder.pt"
        params = _write_decoder(archive)
        trees = {"this tree": REPO, **({"baseline": args.baseline} if args.baseline else {})}
        runs = {
            label: [_measure(code, archive, n) for n in SEQUENCES] for label, code in trees.items()
        }
    result = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"GPT-2-style decoder, vocab {VOCAB}, {params:,} parameters, TorchScript (traced)",
        "data": f"sequences x {TOKENS} tokens, 20% held out for evaluation, batch {BATCH}",
        "baseline": str(args.baseline) if args.baseline else None,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        "# Quantize-stage scoring memory\n\n"
        f"Generated by `python -m bench.bench_eval_memory` on {result['when']}: "
        f"{result['model']}, {result['data']}; all 2-D weights at {BITS} bits.\n\n"
        "| code | sequences | RSS before (MiB) | peak (MiB) | peak above before (MiB) |\n"
        "|---|---:|---:|---:|---:|\n"
        + "".join(_row(label, r) for label, rows in runs.items() for r in rows)
    )
    (RESULTS / "eval_memory.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(_child(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
