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
from mpq_core.scheme import QuantScheme

__all__ = [
    "FLOAT_BITS",
    "MAX_BITS",
    "MIN_BITS",
    "choose_params_many",
    "choose_scales",
    "choose_scales_many",
    "dequantize",
    "errors_from_scales",
    "fake_quantize",
    "fake_quantize_on",
    "float16_dtype",
    "output_major",
    "qmax",
    "quantization_error",
    "quantization_errors",
    "quantize",
    "round_to_float16",
    "ste_mask",
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


def output_major(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``w`` with its output channels on dim 0, the layout every function here expects: a view
    with dims 0 and 1 swapped for a weight stored ``(in, out, ...)`` (GPT-2's ``Conv1D``, a
    transposed convolution). Its own inverse: applied to a result, it gives the stored layout.
    """
    return w.transpose(0, 1) if transposed and w.dim() >= 2 else w


def _rows(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``w`` as contiguous float32 rows, one per scale: ``(channels * groups, columns / groups)``.

    Contiguous even when ``w`` is a transposed view (``output_major``): the clipping search
    makes about 80 passes over the rows, and on a strided view each ran 3x slower."""
    return w.detach().reshape(w.shape[0] * groups, -1).float().contiguous()


def _groups_of(w: torch.Tensor, scales: torch.Tensor) -> int:
    """Scales per output channel: 1 for per-channel ``(C,)`` scales, G for ``(C, G)``."""
    return 1 if scales.dim() <= 1 else scales.shape[-1]


def _code_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest code at ``bits``: ``(-q, q)`` signed, ``(0, 2^b - 1)`` unsigned."""
    q = qmax(bits)
    return (-q, q) if symmetric else (0, 2 * q + 1)


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
    return choose_params_many(w, bits, QuantScheme(), mse=mse)[0]


def choose_params_many(
    w: torch.Tensor, bits: list[int], scheme: QuantScheme, *, mse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of ``w`` under ``scheme`` for every width in ``bits``.

    Returns:
        ``(scales, zeros)``: scales ``(len(bits), C)`` per channel or ``(len(bits), C, G)``
        with G groups per channel (``scheme.groups``), fp16-representable float32; zero points
        of the same shape (integral float32 in ``0..2^b-1``), or None when symmetric. A
        ``FLOAT_BITS`` entry has none: its scales are ones and its zero points zeros, unused.
    """
    groups = scheme.groups(tuple(w.shape))
    shape = (len(bits), w.shape[0]) if groups == 1 else (len(bits), w.shape[0], groups)
    scales = torch.ones(len(bits), w.shape[0] * groups, device=w.device)
    zeros = None if scheme.symmetric else torch.zeros_like(scales)
    ints = [j for j, b in enumerate(bits) if b != FLOAT_BITS]
    if ints:
        found, found_zeros = _search(
            _rows(w, groups), [bits[j] for j in ints], scheme.symmetric, mse
        )
        scales[ints] = found
        if zeros is not None and found_zeros is not None:
            zeros[ints] = found_zeros
    return scales.reshape(shape), None if zeros is None else zeros.reshape(shape)


def _search(
    rows: torch.Tensor, bits: list[int], symmetric: bool, mse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) ``(B, R)`` of least squared error for every row of ``rows``."""
    limits = torch.tensor([_code_limits(b, symmetric) for b in bits], device=rows.device).float()
    if symmetric:
        amax = rows.abs().amax(dim=1)
        stats = torch.where(amax > 0, amax, torch.ones_like(amax))[None]  # (1, R)
    else:  # the range always holds 0, so that zero stays exactly representable
        stats = torch.stack([rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)])
    if not mse:
        ones = torch.ones(len(bits), 1, rows.shape[0], device=rows.device)
        s, z = _params(stats, ones, limits)
        return s[:, 0], None if z is None else z[:, 0]
    out_s = torch.empty(len(bits), rows.shape[0], device=rows.device)
    out_z = None if symmetric else torch.empty_like(out_s)
    block = max(1, _SEARCH_FLOATS // max(len(bits) * len(_CLIP_GRID) * rows.shape[1], 1))
    # One workspace reused by every step: a fresh large temporary per step costs page faults
    # (the allocator returns big blocks to the system) that took as long as the arithmetic.
    size = 2 * len(bits) * len(_CLIP_GRID) * min(block, rows.shape[0]) * rows.shape[1]
    work = torch.empty(size, device=rows.device)
    for start in range(0, rows.shape[0], block):
        stop = start + block
        s, z = _search_block(rows[start:stop], stats[:, start:stop], limits, work)
        out_s[:, start:stop] = s
        if out_z is not None and z is not None:
            out_z[:, start:stop] = z
    return out_s, out_z


def _params(
    stats: torch.Tensor, ratios: torch.Tensor, limits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points ``(B, g, R)`` at clipping ``ratios`` ``(B, g, R)``: symmetric
    (``stats`` = row maxima ``(1, R)``) ``s = amax * r / q``; asymmetric (``stats`` = row
    minima and maxima ``(2, R)``) ``s = (hi - lo) * r / (2^b - 1)``, ``z = round(-lo * r / s)``."""
    top = limits[:, 1][:, None, None]
    if stats.shape[0] == 1:
        return _round_scales(stats[0][None, None, :] * ratios / top), None
    lo, hi = stats[0][None, None, :] * ratios, stats[1][None, None, :] * ratios
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    scales = _round_scales(span / top)
    zeros = torch.clamp(torch.round(-lo / scales), torch.zeros_like(top), top)
    return scales, zeros


def _search_block(
    rows: torch.Tensor, stats: torch.Tensor, limits: torch.Tensor, work: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) ``(B, R)`` of least squared error for a block of rows
    ``(R, K)`` with row statistics ``stats``, at every code range in ``limits`` ``(B, 2)``."""
    nb, nr = limits.shape[0], rows.shape[0]
    grid = torch.tensor(_CLIP_GRID, device=rows.device)[None, :, None].expand(nb, -1, nr)
    best_err, best = _best_of(rows, stats, grid, limits, work)
    for h in _REFINE_STEPS:
        cand = torch.stack([best - h, best + h], dim=1).clamp(_MIN_RATIO, 1.0)  # (B, 2, R)
        err, ratio = _best_of(rows, stats, cand, limits, work)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    scales, zeros = _params(stats, best[:, None, :], limits)
    return scales[:, 0], None if zeros is None else zeros[:, 0]


def _best_of(
    rows: torch.Tensor,
    stats: torch.Tensor,
    ratios: torch.Tensor,
    limits: torch.Tensor,
    work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squared error ``(B, R)`` of each row among the clipping ``ratios`` ``(B, g, R)``,
    and the ratio reaching it."""
    lo, hi = limits[:, 0, None, None, None], limits[:, 1, None, None, None]
    scales, zeros = _params(stats, ratios, limits)
    scales = scales[..., None]
    nb, ng, nr = ratios.shape
    size = nb * ng * nr * rows.shape[1]
    t = work[:size].view(nb, ng, nr, rows.shape[1])
    codes = work[size : 2 * size].view(nb, ng, nr, rows.shape[1])
    # |Q(x) - x| = s * |clamp(round(x/s) + z) - z - x/s|: a few passes over the block, in the
    # caller's workspace, and the norm is one reduction instead of a square and a sum.
    torch.div(rows, scales, out=t)
    torch.round(t, out=codes)
    if zeros is None:
        codes.clamp_(lo, hi)
    else:
        z = zeros[..., None]
        codes.add_(z).clamp_(lo, hi).sub_(z)
    codes.sub_(t)
    err = torch.linalg.vector_norm(codes, dim=3).square_().mul_(scales[..., 0].square())
    err_min, idx = err.min(dim=1)
    return err_min, ratios.gather(1, idx[:, None]).squeeze(1)


def quantize(
    w: torch.Tensor, scales: torch.Tensor, bits: int, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``scales`` (``(C,)`` per channel, ``(C, G)`` per
    group of columns): ``int8`` signed codes, or with ``zeros`` ``uint8`` codes in
    ``0..2^b-1``."""
    lo, hi = _code_limits(bits, zeros is None)
    groups = _groups_of(w, scales)
    rows = _rows(w, groups)
    codes = torch.round(rows / scales.reshape(-1)[:, None])
    if zeros is None:
        return torch.clamp(codes, lo, hi).to(torch.int8).reshape(w.shape)
    codes = torch.clamp(codes + zeros.reshape(-1).float()[:, None], lo, hi)
    return codes.to(torch.uint8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float weights from codes, scales (``(C,)`` or ``(C, G)``) and zero points."""
    rows = codes.reshape(scales.numel(), -1).float()
    if zeros is not None:
        rows = rows - zeros.reshape(-1).float()[:, None]
    rows = rows * scales.float().reshape(-1)[:, None]
    return rows.reshape(codes.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor, bits: int, *, mse: bool = True, scheme: QuantScheme | None = None
) -> torch.Tensor:
    """``dequantize(quantize(w))``: the weight as the quantized model will see it (at
    ``FLOAT_BITS``, ``w`` rounded to a 16-bit float)."""
    if bits == FLOAT_BITS:
        return round_to_float16(w)
    qmax(bits)
    scales, zeros = choose_params_many(w, [bits], scheme or QuantScheme(), mse=mse)
    return fake_quantize_on(w, scales[0], bits, None if zeros is None else zeros[0])


def fake_quantize_on(
    w: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zeros: torch.Tensor | None = None,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(w, scales, bits, zeros))`` on scales already chosen, exactly, in
    ``w``'s dtype and stored layout (``transposed``: stored ``(in, out, ...)``, scales along
    dim 1; at ``FLOAT_BITS``, ``w`` rounded to a 16-bit float).

    Computed in float32 rows without integer codes: fine-tuning loads every layer this way
    before each step, and the codes path held three float32 temporaries of the layer (1.2 GB
    for a 1B decoder's embedding), this one two."""
    if bits == FLOAT_BITS:
        return round_to_float16(w.detach())
    v = output_major(w.detach(), transposed)
    rows = _rows(v, _groups_of(v, scales))
    q = _fake_quantized_rows(rows, scales, bits, zeros).reshape(v.shape).to(w.dtype)
    return output_major(q, transposed)


def quantization_error(
    w: torch.Tensor, bits: int, *, mse: bool = True, scheme: QuantScheme | None = None
) -> torch.Tensor:
    """``Q_b(W) - W``, the perturbation the sensitivities are measured along."""
    return fake_quantize(w, bits, mse=mse, scheme=scheme) - w.detach()


def quantization_errors(
    w: torch.Tensor, bits: list[int], *, mse: bool = True, scheme: QuantScheme | None = None
) -> torch.Tensor:
    """``Q_b(W) - W`` for every width in ``bits``, stacked: ``(len(bits), *w.shape)``."""
    scales, zeros = choose_params_many(w, bits, scheme or QuantScheme(), mse=mse)
    return errors_from_scales(w, bits, scales, zeros=zeros)


def errors_from_scales(
    w: torch.Tensor,
    bits: list[int],
    scales: torch.Tensor,
    *,
    zeros: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q_b(W) - W`` for every width, on scales (and zero points) already chosen
    (``choose_params_many``): no clipping search, one quantize/dequantize per width. Written
    into ``out`` (a ``(len(bits), *w.shape)`` float tensor) when given, so a caller can reuse one
    buffer for layer after layer; the difference is taken in ``out``'s dtype (``w``'s without
    it), so a float32 ``out`` holds a 16-bit weight's errors exactly.

    ``Q_b(W)`` is exactly ``dequantize(quantize(W))`` in ``w``'s dtype, computed in one float
    row tensor per width without the integer codes (the sensitivity passes rebuild a layer's
    errors for every batch, so this is on their path)."""
    if out is None:
        out = torch.empty((len(bits), *w.shape), dtype=w.dtype, device=w.device)
    w = w.detach()
    # One contiguous float32 copy serves every width: as rows per scale and, in ``out``'s
    # dtype, as the weight subtracted. ``w`` may be a transposed view (``output_major``): an
    # elementwise op mixing its strides with contiguous tensors ran several times slower.
    base = w.float().contiguous()
    ref = base if out.dtype == torch.float32 else base.to(out.dtype)
    for j, (b, s) in enumerate(zip(bits, scales, strict=True)):
        if b == FLOAT_BITS:
            wq = round_to_float16(base.to(w.dtype))
        else:
            rows = base.reshape(w.shape[0] * _groups_of(w, s), -1)
            z = None if zeros is None else zeros[j]
            wq = _fake_quantized_rows(rows, s, b, z).reshape(w.shape).to(w.dtype)
        torch.sub(wq.to(out.dtype), ref, out=out[j])
    return out


def _fake_quantized_rows(
    rows: torch.Tensor, scales: torch.Tensor, bits: int, zeros: torch.Tensor | None
) -> torch.Tensor:
    """``dequantize(quantize(rows))`` in float32, the same operations in the same order
    (round, shift by the zero point, clamp, unshift, scale), in place on one new tensor."""
    lo, hi = _code_limits(bits, zeros is None)
    s = scales.float().reshape(-1)[:, None]
    q = torch.div(rows, s).round_()
    if zeros is None:
        return q.clamp_(lo, hi).mul_(s)
    z = zeros.reshape(-1).float()[:, None]
    return q.add_(z).clamp_(lo, hi).sub_(z).mul_(s)


def ste_mask(
    w: torch.Tensor, scales: torch.Tensor, bits: int, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """Where a straight-through estimator passes the gradient: the weights inside the grid's
    range, up to half a step beyond its end codes (outside, rounding clips them)."""
    lo, hi = _code_limits(bits, zeros is None)
    s = scales.float().reshape(-1)[:, None]
    rows = w.reshape(scales.numel(), -1)
    if zeros is None:
        inside = rows.abs() <= (hi + 0.5) * s
    else:
        z = zeros.float().reshape(-1)[:, None]
        inside = (rows >= (lo - z - 0.5) * s) & (rows <= (hi - z + 0.5) * s)
    return inside.reshape(w.shape)
