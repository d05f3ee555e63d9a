"""Weight quantizer: symmetric, per output channel, uniform, 2..8 bits, MSE-chosen clipping.

Pure tensor functions with no model knowledge. Codes are signed integers in
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the symmetric "narrow" range, so zero is exact and the grid
is the same on both sides); the scale of channel ``c`` is stored as fp16, and the scales used
here are already rounded to fp16 so that a model dequantized from the packed checkpoint is
bit-identical to the simulated one.
"""

from __future__ import annotations

import torch

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "choose_scales",
    "choose_scales_many",
    "dequantize",
    "fake_quantize",
    "qmax",
    "quantization_error",
    "quantization_errors",
    "quantize",
]

MIN_BITS = 2
MAX_BITS = 8
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): scales below it would round to 0
# Clipping ratios tried per channel: a coarse grid, then a fine one around each channel's best.
# 1.0 (plain max scaling) is always among them, so the MSE choice is never worse than it.
_CLIP_GRID = torch.linspace(0.2, 1.0, 9)
_REFINE_STEPS = (torch.tensor([-0.05, -0.025, 0.025, 0.05]), torch.tensor([-0.0125, 0.0125]))


def qmax(bits: int) -> int:
    """Largest code magnitude at ``bits``."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return 2 ** (bits - 1) - 1


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
    return choose_scales_many(w, [bits], mse=mse)[0]


def choose_scales_many(w: torch.Tensor, bits: list[int], *, mse: bool = True) -> torch.Tensor:
    """``choose_scales`` for several bit widths at once, ``(len(bits), channels)``; one batched
    search instead of one per width, which is what small layers spend their time on."""
    q = torch.tensor([qmax(b) for b in bits], dtype=torch.float32, device=w.device)[:, None]
    rows = _rows(w)
    amax = rows.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))[None, :]  # (1, C)
    if not mse:
        return _round_scales(amax / q)
    coarse = _CLIP_GRID.to(rows.device)[None, :, None].expand(len(bits), -1, rows.shape[0])
    best = _best_ratio(rows, amax, coarse, q)  # (B, C)
    for refine in _REFINE_STEPS:
        steps = refine.to(rows.device)[None, :, None]
        fine = torch.cat([best[:, None, :], (best[:, None, :] + steps).clamp(0.05, 1.0)], dim=1)
        best = _best_ratio(rows, amax, fine, q)
    return _round_scales(amax * best / q)


def _best_ratio(
    rows: torch.Tensor, amax: torch.Tensor, ratios: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Each channel's clipping ratio of least squared error among ``ratios`` ``(B, g, C)``,
    for bit widths with code limits ``q`` ``(B, 1)``."""
    nb, ng, _ = ratios.shape
    best_err = torch.full((nb, rows.shape[0]), float("inf"), device=rows.device)
    best = ratios[:, 0].clone()
    # Chunk the grid so a large layer does not hold (widths x grid x params) floats at once.
    chunk = max(1, int(2**24 // max(rows.numel() * nb, 1)))
    qq = q[:, :, None, None]  # (B, 1, 1, 1)
    for start in range(0, ng, chunk):
        r = ratios[:, start : start + chunk]  # (B, g, C)
        scales = _round_scales(amax[:, None, :] * r / q[:, :, None])  # (B, g, C)
        codes = torch.clamp(torch.round(rows / scales[..., None]), -qq, qq)  # (B, g, C, K)
        err = ((codes * scales[..., None] - rows) ** 2).sum(dim=3)  # (B, g, C)
        err_min, idx = err.min(dim=1)
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best = torch.where(better, r.gather(1, idx[:, None]).squeeze(1), best)
    return best


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
    """``dequantize(quantize(w))``: the weight as the quantized model will see it."""
    scales = choose_scales(w, bits, mse=mse)
    return dequantize(quantize(w, scales, bits), scales, dtype=w.dtype)


def quantization_error(w: torch.Tensor, bits: int, *, mse: bool = True) -> torch.Tensor:
    """``Q_b(W) - W``, the perturbation the sensitivities are measured along."""
    return fake_quantize(w, bits, mse=mse) - w.detach()


def quantization_errors(w: torch.Tensor, bits: list[int], *, mse: bool = True) -> torch.Tensor:
    """``Q_b(W) - W`` for every width in ``bits``, stacked: ``(len(bits), *w.shape)``."""
    all_scales = choose_scales_many(w, bits, mse=mse)
    return torch.stack(
        [
            dequantize(quantize(w, scales, b), scales, dtype=w.dtype) - w.detach()
            for b, scales in zip(bits, all_scales, strict=True)
        ]
    )
