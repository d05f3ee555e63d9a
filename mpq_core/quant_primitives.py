"""Weight quantizer: symmetric, per output channel, uniform, 2..8 bits, MSE-chosen clipping.

The width ``FLOAT_BITS`` (16) keeps a weight unquantized, rounded to a 16-bit float (bfloat16
for a bfloat16 weight, else float16): ``fake_quantize``, ``quantization_errors`` and
``errors_from_scales`` accept it (its error is that rounding), the integer code functions
(``qmax``, ``choose_scales``, ``quantize``) do not.

Pure tensor functions with no model knowledge. Codes are signed integers in
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the symmetric "narrow" range, so zero is exact and the grid
is the same on both sides); the scale of channel ``c`` is stored as fp16, and the scales used
here are already rounded to fp16 so that a model dequantized from the packed checkpoint is
bit-identical to the simulated one.
"""

from __future__ import annotations

import torch

from mpq_core.layers import FLOAT_BITS

__all__ = [
    "FLOAT_BITS",
    "MAX_BITS",
    "MIN_BITS",
    "choose_scales",
    "choose_scales_many",
    "dequantize",
    "errors_from_scales",
    "fake_quantize",
    "float16_dtype",
    "qmax",
    "quantization_error",
    "quantization_errors",
    "quantize",
    "round_to_float16",
]

MIN_BITS = 2
MAX_BITS = 8
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): scales below it would round to 0
# Clipping search: a coarse grid of ratios, then a pattern search that tries each channel's best
# +- h for h halving from half the grid step: 5 + 2*4 = 13 evaluations per width and channel
# (the previous 9-point grid with two refinement rounds took 17) for the same final resolution,
# 0.0125 (bench/bench_clipping.py: the same squared error within 0.07%). 1.0 (plain max
# scaling) is on the grid and a candidate only replaces a strictly better one, so the MSE choice
# is never worse than max scaling (up to float rounding in the error compared).
_CLIP_GRID = (0.2, 0.4, 0.6, 0.8, 1.0)
_REFINE_STEPS = (0.1, 0.05, 0.025, 0.0125)
_MIN_RATIO = 0.05
# Floats one search step may hold at once (widths x candidates x rows x columns): the search
# works on blocks of channels, so its memory is a few MB whatever the layer's size, and each
# block stays in cache through the handful of passes one candidate takes.
_SEARCH_FLOATS = 2**20


def qmax(bits: int) -> int:
    """Largest code magnitude at ``bits``."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return 2 ** (bits - 1) - 1


def float16_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit float a weight of ``dtype`` is kept in at ``FLOAT_BITS``: bfloat16 for a
    bfloat16 weight (no rounding at all), float16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def round_to_float16(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its ``float16_dtype`` and back to its own dtype (the weight a layer
    kept at ``FLOAT_BITS`` has). Beyond float16's range a value saturates, not overflows."""
    half = float16_dtype(w.dtype)
    if half == torch.float16:
        w = w.detach().clamp(-_FP16_MAX, _FP16_MAX)
    return w.detach().to(half).to(w.dtype)


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).float()


def _round_scales(scales: torch.Tensor) -> torch.Tensor:
    # Beyond fp16's range a scale would become inf; such weights saturate instead.
    return scales.clamp(_FP16_TINY, _FP16_MAX).half().float()


def choose_scales(w: torch.Tensor, bits: int, *, mse: bool = True) -> torch.Tensor:
    """Per-output-channel scales (fp16-representable, returned as float32).

    Args:
        w: weight, output channel first.
        bits: 2..8.
        mse: pick each channel's clipping from a grid to minimise squared error; ``False``
            is plain max scaling.

    Example:
        >>> w = torch.randn(4, 16)
        >>> choose_scales(w, 4).shape
        torch.Size([4])
    """
    qmax(bits)  # validates the width: a layer kept at FLOAT_BITS has no scales
    return choose_scales_many(w, [bits], mse=mse)[0]


def choose_scales_many(w: torch.Tensor, bits: list[int], *, mse: bool = True) -> torch.Tensor:
    """``choose_scales`` for several bit widths at once, ``(len(bits), channels)``; one batched
    search instead of one per width, which is what small layers spend their time on. A
    ``FLOAT_BITS`` entry has no scales: its row is ones, and unused."""
    if FLOAT_BITS in bits:
        ints = [b for b in bits if b != FLOAT_BITS]
        out = torch.ones(len(bits), w.shape[0], device=w.device)
        if ints:
            found = choose_scales_many(w, ints, mse=mse)
            out[[j for j, b in enumerate(bits) if b != FLOAT_BITS]] = found
        return out
    q = torch.tensor([qmax(b) for b in bits], dtype=torch.float32, device=w.device)
    rows = _rows(w)
    amax = rows.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    if not mse:
        return _round_scales(amax[None, :] / q[:, None])
    out = torch.empty(len(bits), rows.shape[0], device=rows.device)
    block = max(1, _SEARCH_FLOATS // max(len(bits) * len(_CLIP_GRID) * rows.shape[1], 1))
    # One workspace reused by every step: a fresh large temporary per step costs page faults
    # (the allocator returns big blocks to the system) that took as long as the arithmetic.
    size = 2 * len(bits) * len(_CLIP_GRID) * min(block, rows.shape[0]) * rows.shape[1]
    work = torch.empty(size, device=rows.device)
    for start in range(0, rows.shape[0], block):
        stop = start + block
        out[:, start:stop] = _search_block(rows[start:stop], amax[start:stop], q, work)
    return out


def _search_block(
    rows: torch.Tensor, amax: torch.Tensor, q: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """Scales ``(B, R)`` of least squared error for a block of rows ``(R, K)`` with maxima
    ``amax`` ``(R,)``, at every code limit in ``q`` ``(B,)``."""
    nb, nr = q.shape[0], rows.shape[0]
    grid = torch.tensor(_CLIP_GRID, device=rows.device)[None, :, None].expand(nb, -1, nr)
    best_err, best = _best_of(rows, amax, grid, q, work)
    for h in _REFINE_STEPS:
        cand = torch.stack([best - h, best + h], dim=1).clamp(_MIN_RATIO, 1.0)  # (B, 2, R)
        err, ratio = _best_of(rows, amax, cand, q, work)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return _round_scales(amax[None, :] * best / q[:, None])


def _best_of(
    rows: torch.Tensor,
    amax: torch.Tensor,
    ratios: torch.Tensor,
    q: torch.Tensor,
    work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squared error ``(B, R)`` of each row among the clipping ``ratios`` ``(B, g, R)``,
    and the ratio reaching it."""
    qq = q[:, None, None, None]
    scales = _round_scales(amax[None, None, :] * ratios / q[:, None, None])[..., None]
    nb, ng, nr = ratios.shape
    size = nb * ng * nr * rows.shape[1]
    t = work[:size].view(nb, ng, nr, rows.shape[1])
    codes = work[size : 2 * size].view(nb, ng, nr, rows.shape[1])
    # |Q(x) - x| = s * |round(x/s) - x/s| (clamped): five passes over the block, in the
    # caller's workspace, and the norm is one reduction instead of a square and a sum.
    torch.div(rows, scales, out=t)
    torch.round(t, out=codes).clamp_(-qq, qq).sub_(t)
    err = torch.linalg.vector_norm(codes, dim=3).square_().mul_(scales[..., 0].square())
    err_min, idx = err.min(dim=1)
    return err_min, ratios.gather(1, idx[:, None]).squeeze(1)


def quantize(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8) of ``w`` on the per-channel grid ``scales``."""
    q = qmax(bits)
    rows = _rows(w)
    codes = torch.clamp(torch.round(rows / scales[:, None]), -q, q)
    return codes.to(torch.int8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float weights from codes and per-channel scales."""
    rows = codes.reshape(codes.shape[0], -1).float() * scales.float()[:, None]
    return rows.reshape(codes.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, *, mse: bool = True) -> torch.Tensor:
    """``dequantize(quantize(w))``: the weight as the quantized model will see it (at
    ``FLOAT_BITS``, ``w`` rounded to a 16-bit float)."""
    if bits == FLOAT_BITS:
        return round_to_float16(w)
    scales = choose_scales(w, bits, mse=mse)
    return dequantize(quantize(w, scales, bits), scales, dtype=w.dtype)


def quantization_error(w: torch.Tensor, bits: int, *, mse: bool = True) -> torch.Tensor:
    """``Q_b(W) - W``, the perturbation the sensitivities are measured along."""
    return fake_quantize(w, bits, mse=mse) - w.detach()


def quantization_errors(w: torch.Tensor, bits: list[int], *, mse: bool = True) -> torch.Tensor:
    """``Q_b(W) - W`` for every width in ``bits``, stacked: ``(len(bits), *w.shape)``."""
    return errors_from_scales(w, bits, choose_scales_many(w, bits, mse=mse))


def errors_from_scales(
    w: torch.Tensor, bits: list[int], scales: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q_b(W) - W`` for every width, on scales already chosen (``choose_scales_many``): no
    clipping search, one quantize/dequantize per width. Written into ``out`` (a
    ``(len(bits), *w.shape)`` tensor of ``w``'s dtype) when given, so a caller can reuse one
    buffer for layer after layer."""
    if out is None:
        out = torch.empty((len(bits), *w.shape), dtype=w.dtype, device=w.device)
    for j, (b, s) in enumerate(zip(bits, scales, strict=True)):
        if b == FLOAT_BITS:
            torch.sub(round_to_float16(w), w.detach(), out=out[j])
        else:
            torch.sub(dequantize(quantize(w, s, b), s, dtype=w.dtype), w.detach(), out=out[j])
    return out
