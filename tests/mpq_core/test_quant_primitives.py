from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_core.quant_primitives import (
    choose_scales,
    dequantize,
    fake_quantize,
    qmax,
    quantization_error,
    quantize,
)

ALL_BITS = list(range(2, 9))


def _weight(seed: int, shape: tuple[int, ...] = (8, 3, 3, 3), heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if heavy:  # Student-t with 2 degrees of freedom: rare huge outliers
        z = torch.randn(shape, generator=g)
        chi = (torch.randn((2, *shape), generator=g) ** 2).sum(0)
        return z / torch.sqrt(chi / 2)
    return torch.randn(shape, generator=g) * 0.1


def _channel_sse(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return ((wq - w) ** 2).reshape(w.shape[0], -1).sum(1)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("mse", [True, False])
def test_codes_within_symmetric_range(bits: int, mse: bool) -> None:
    w = _weight(bits, heavy=True)
    q = 2 ** (bits - 1) - 1
    assert qmax(bits) == q
    codes = quantize(w, choose_scales(w, bits, mse=mse), bits)
    assert codes.dtype == torch.int8
    assert codes.shape == w.shape
    assert int(codes.min()) >= -q and int(codes.max()) <= q
    if not mse:  # max scaling puts every channel's largest weight on the end of the grid
        per_channel = codes.reshape(w.shape[0], -1).abs().amax(1)
        assert per_channel.tolist() == [q] * w.shape[0]


@pytest.mark.parametrize("heavy", [False, True])
def test_error_falls_as_bits_rise(heavy: bool) -> None:
    w = _weight(0, (16, 64), heavy=heavy)
    mse = [float((quantization_error(w, b) ** 2).mean()) for b in ALL_BITS]
    assert all(lo < hi for hi, lo in itertools.pairwise(mse)), mse
    assert mse[-1] < mse[0] / 100


def test_quantization_error_is_fake_quantize_minus_weight() -> None:
    w = _weight(1)
    assert torch.equal(quantization_error(w, 3), fake_quantize(w, 3) - w)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    heavy=st.booleans(),
    channels=st.integers(1, 6),
    width=st.integers(1, 40),
)
def test_mse_clipping_never_worse_than_max_scaling(
    seed: int, bits: int, heavy: bool, channels: int, width: int
) -> None:
    w = _weight(seed, (channels, width), heavy=heavy)
    err_mse = _channel_sse(w, fake_quantize(w, bits, mse=True))
    err_max = _channel_sse(w, fake_quantize(w, bits, mse=False))
    # Per channel; the slack only absorbs float32 summation-order differences.
    assert bool((err_mse <= err_max * (1 + 1e-5) + 1e-12).all()), (err_mse, err_max)


def test_mse_clipping_strictly_helps_heavy_tails() -> None:
    w = _weight(3, (8, 256), heavy=True)
    err_mse = _channel_sse(w, fake_quantize(w, 4, mse=True)).sum()
    err_max = _channel_sse(w, fake_quantize(w, 4, mse=False)).sum()
    assert err_mse < 0.9 * err_max


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1.0, 50.0])
def test_scales_are_fp16_representable(bits: int, scale: float) -> None:
    w = _weight(bits, (6, 10), heavy=True) * scale
    for mse in (True, False):
        s = choose_scales(w, bits, mse=mse)
        assert s.dtype == torch.float32 and s.shape == (6,)
        assert torch.equal(s, s.half().float())
        assert bool((s > 0).all()) and bool(torch.isfinite(s).all())


@pytest.mark.parametrize("bits", ALL_BITS)
def test_all_zero_channel_is_safe(bits: int) -> None:
    w = _weight(0, (4, 9))
    w[1] = 0.0
    w[3, :] = 0.0
    for mse in (True, False):
        s = choose_scales(w, bits, mse=mse)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
        wq = fake_quantize(w, bits, mse=mse)
        assert not bool(torch.isnan(wq).any())
        assert torch.equal(wq[1], torch.zeros(9)) and torch.equal(wq[3], torch.zeros(9))
        assert torch.equal(quantize(w, s, bits)[1], torch.zeros(9, dtype=torch.int8))
    zeros = torch.zeros(3, 5)
    assert torch.equal(fake_quantize(zeros, bits), zeros)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(5, 7), (4, 2, 3, 3), (3, 2, 2, 2, 2), (6, 1)])
def test_dequantize_of_quantize_is_fake_quantize_bit_exact(
    bits: int, shape: tuple[int, ...]
) -> None:
    w = _weight(bits, shape, heavy=True)
    for mse in (True, False):
        s = choose_scales(w, bits, mse=mse)
        codes = quantize(w, s, bits)
        assert torch.equal(dequantize(codes, s), fake_quantize(w, bits, mse=mse))
        # Through an fp16 checkpoint and back: still identical.
        assert torch.equal(dequantize(codes, s.half()), fake_quantize(w, bits, mse=mse))


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 15, 17])
def test_bits_outside_range_raise(bits: int) -> None:
    w = _weight(0, (2, 3))
    with pytest.raises(ValueError, match="bits"):
        qmax(bits)
    with pytest.raises(ValueError, match="bits"):
        choose_scales(w, bits)
    with pytest.raises(ValueError, match="bits"):
        choose_scales(w, bits, mse=False)
    with pytest.raises(ValueError, match="bits"):
        quantize(w, torch.ones(2), bits)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize(w, bits)
    with pytest.raises(ValueError, match="bits"):
        quantization_error(w, bits)


def test_16_bits_has_no_codes_and_rounds_to_float16() -> None:
    w = _weight(0, (2, 3))
    for fn in (qmax, lambda b: choose_scales(w, b), lambda b: quantize(w, torch.ones(2), b)):
        with pytest.raises(ValueError, match="bits"):
            fn(16)
    assert torch.equal(fake_quantize(w, 16), w.half().float())
    assert torch.equal(quantization_error(w, 16), w.half().float() - w)
