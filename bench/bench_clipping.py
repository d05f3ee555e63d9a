"""Cost and quality of the MSE clipping search (``quant_primitives.choose_scales_many``).

Run: ``python -m bench.bench_clipping``. Writes ``bench/results/clipping.{json,md}``.

The search of record until issue 10 (a 9-point grid of clipping ratios, then two refinement
rounds around each channel's best: 17 evaluations per width and channel, on the whole layer at
once) is kept here verbatim as ``reference_scales`` and timed against the current one on the
shapes of a GPT-2 MLP weight (768x3072) and its embedding (50257x768), at bits 2,3,4,5,6,8.
Quality: the squared error of the quantized weight with each search's scales, on Gaussian,
uniform and heavy-tailed (Student-t, 2 d.o.f.) weights, as the ratio current / reference.
One thread.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import torch

from mpq_core.quant_primitives import choose_scales_many, dequantize, qmax, quantize

RESULTS = Path(__file__).resolve().parent / "results"
BITS = [2, 3, 4, 5, 6, 8]
TIMED_SHAPES = [(768, 3072), (3072, 768), (50257, 768)]
QUALITY_SHAPE = (1024, 768)

_REF_GRID = torch.linspace(0.2, 1.0, 9)
_REF_REFINE = (torch.tensor([-0.05, -0.025, 0.025, 0.05]), torch.tensor([-0.0125, 0.0125]))


def _round_scales(scales: torch.Tensor) -> torch.Tensor:
    return scales.clamp(2.0**-24, 65504.0).half().float()


def _ref_best_ratio(
    rows: torch.Tensor, amax: torch.Tensor, ratios: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    nb, ng, _ = ratios.shape
    best_err = torch.full((nb, rows.shape[0]), float("inf"))
    best = ratios[:, 0].clone()
    chunk = max(1, int(2**24 // max(rows.numel() * nb, 1)))
    qq = q[:, :, None, None]
    for start in range(0, ng, chunk):
        r = ratios[:, start : start + chunk]
        scales = _round_scales(amax[:, None, :] * r / q[:, :, None])
        codes = torch.clamp(torch.round(rows / scales[..., None]), -qq, qq)
        err = ((codes * scales[..., None] - rows) ** 2).sum(dim=3)
        err_min, idx = err.min(dim=1)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best = torch.where(better, r.gather(1, idx[:, None]).squeeze(1), best)
    return best


def reference_scales(w: torch.Tensor, bits: list[int]) -> torch.Tensor:
    """The previous search, verbatim: ``(len(bits), channels)`` fp16-representable scales."""
    q = torch.tensor([qmax(b) for b in bits], dtype=torch.float32)[:, None]
    rows = w.reshape(w.shape[0], -1).float()
    amax = rows.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))[None, :]
    coarse = _REF_GRID[None, :, None].expand(len(bits), -1, rows.shape[0])
    best = _ref_best_ratio(rows, amax, coarse, q)
    for refine in _REF_REFINE:
        steps = refine[None, :, None]
        fine = torch.cat([best[:, None, :], (best[:, None, :] + steps).clamp(0.05, 1.0)], dim=1)
        best = _ref_best_ratio(rows, amax, fine, q)
    return _round_scales(amax * best / q)


def _weights(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "uniform":
        return torch.rand(shape, generator=g) - 0.5
    z = torch.randn(shape, generator=g)
    chi = (torch.randn((2, *shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi / 2)  # Student-t, 2 degrees of freedom


def _sse(w: torch.Tensor, scales: torch.Tensor, bits: int) -> float:
    return float(((dequantize(quantize(w, scales, bits), scales) - w).double() ** 2).sum())


def _timed(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> dict[str, Any]:
    # One thread: the machine's two cores are shared, and multi-threaded element-wise kernels
    # slow down 100x when another process holds a core; both searches run alike.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    timing = []
    for shape in TIMED_SHAPES:
        w = torch.randn(shape) * 0.02
        repeats = 1 if shape[0] * shape[1] > 10**7 else 3
        before = _timed(lambda w=w: reference_scales(w, BITS), repeats)
        after = _timed(lambda w=w: choose_scales_many(w, BITS), repeats)
        timing.append({"shape": list(shape), "before_s": before, "after_s": after})
        print(f"{shape}: before {before:.3f} s, after {after:.3f} s, x{before / after:.2f}")
    quality: list[dict[str, Any]] = []
    for kind in ("gaussian", "uniform", "heavy"):
        w = _weights(kind, QUALITY_SHAPE, 1)
        ref, new = reference_scales(w, BITS), choose_scales_many(w, BITS)
        for j, b in enumerate(BITS):
            ratio = _sse(w, new[j], b) / _sse(w, ref[j], b)
            quality.append({"weights": kind, "bits": b, "sse_ratio": ratio})
            print(f"{kind:8s} {b} bits: SSE current/reference {ratio:.5f}")
    mean = sum(q["sse_ratio"] for q in quality) / len(quality)
    worst = max(q["sse_ratio"] for q in quality)
    result = {
        "schema_version": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bits": BITS,
        "timing": timing,
        "quality": quality,
        "sse_ratio_mean": mean,
        "sse_ratio_worst": worst,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "clipping.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "clipping.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# MSE clipping search: previous vs current",
        "",
        f"{r['date']}, torch {r['torch']}, {r['threads']} threads, bits {r['bits']}.",
        "Run: `python -m bench.bench_clipping`.",
        "",
        "| weight shape | previous (s) | current (s) | speed-up |",
        "|---|---|---|---|",
    ]
    for t in r["timing"]:
        shape = "x".join(str(s) for s in t["shape"])
        speed = t["before_s"] / t["after_s"]
        lines.append(f"| {shape} | {t['before_s']:.3f} | {t['after_s']:.3f} | {speed:.1f}x |")
    lines += ["", "| weights | bits | SSE current / previous |", "|---|---|---|"]
    for q in r["quality"]:
        lines.append(f"| {q['weights']} | {q['bits']} | {q['sse_ratio']:.4f} |")
    lines += [
        "",
        f"Mean ratio {r['sse_ratio_mean']:.4f}, worst {r['sse_ratio_worst']:.4f} "
        f"(1024x768 weights; below 1 the current search finds smaller errors).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
