"""Quantizer schemes: group-wise scales and asymmetric codes, chosen per job."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpq_core.budgets import Budget, budget_constraint
from mpq_core.cli.spec_args import add_spec_arguments, spec_from_args
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import load_model
from mpq_core.layers import LayerInfo
from mpq_core.packed_checkpoint import load_packed_checkpoint, restore_into
from mpq_core.packing import pack_codes, unpack_codes
from mpq_core.pipeline import quantize_model
from mpq_core.quant_primitives import (
    choose_params_many,
    dequantize,
    fake_quantize,
    quantization_errors,
    quantize,
    ste_mask,
)
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity.layer_errors import LayerErrors
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.conftest import save_bytes, stock_load

SCHEMES = [
    QuantScheme(),
    QuantScheme(symmetric=False),
    QuantScheme(group_size=32),
    QuantScheme(group_size=32, symmetric=False),
]
IDS = ["channel-sym", "channel-asym", "g32-sym", "g32-asym"]


def _weight(shape: tuple[int, ...], seed: int = 0, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    if heavy:  # Student-t, 2 degrees of freedom
        return z / torch.sqrt((torch.randn((2, *shape), generator=g) ** 2).sum(0) / 2)
    return z * 0.1


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("shape", [(6, 96), (4, 8, 2, 2), (5, 40), (3, 32)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_scales_and_zero_points_reproduce_fake_quantize(
    scheme: QuantScheme, shape: tuple[int, ...], bits: int
) -> None:
    w = _weight(shape, bits, heavy=True)
    scales, zeros = choose_params_many(w, [bits], scheme)
    groups = scheme.groups(shape)  # 96 -> 3 groups of 32; 8*2*2 = 32 and 40 -> per channel
    assert groups == (3 if shape == (6, 96) and scheme.group_size else 1)
    want = (1, shape[0]) if groups == 1 else (1, shape[0], groups)
    assert tuple(scales.shape) == want and torch.equal(scales, scales.half().float())
    z = None if zeros is None else zeros[0]
    assert (z is None) == scheme.symmetric
    codes = quantize(w, scales[0], bits, z)
    if scheme.symmetric:
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    else:
        assert z is not None and codes.dtype == torch.uint8
        assert int(codes.max()) <= 2**bits - 1 and float(z.max()) <= 2**bits - 1
    deq = dequantize(codes, scales[0], zeros=z)
    assert torch.equal(deq, fake_quantize(w, bits, scheme=scheme))
    assert torch.equal(quantization_errors(w, [bits], scheme=scheme)[0], deq - w)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_mse_search_never_worse_than_plain_range(scheme: QuantScheme) -> None:
    w = _weight((16, 128), 3, heavy=True)
    for bits in (2, 4, 8):
        searched = ((fake_quantize(w, bits, scheme=scheme) - w) ** 2).sum()
        plain = ((fake_quantize(w, bits, scheme=scheme, mse=False) - w) ** 2).sum()
        assert float(searched) <= float(plain) * (1 + 1e-5)


def test_asymmetric_codes_fit_skewed_weights_and_groups_fit_outliers() -> None:
    skewed = _weight((16, 128), 1).abs()  # all positive: half a symmetric grid goes unused
    sym = float((quantization_errors(skewed, [3])[0] ** 2).sum())
    asym = float((quantization_errors(skewed, [3], scheme=SCHEMES[1])[0] ** 2).sum())
    assert asym < 0.5 * sym
    heavy = _weight((16, 128), 2, heavy=True)
    per_channel = float((quantization_errors(heavy, [4])[0] ** 2).sum())
    grouped = float((quantization_errors(heavy, [4], scheme=SCHEMES[2])[0] ** 2).sum())
    assert grouped < per_channel


def test_layer_errors_follow_the_scheme() -> None:
    weights = {"a": _weight((8, 64), 4), "b": _weight((3, 10), 5)}
    for scheme in SCHEMES:
        errors = LayerErrors(weights, ["a", "b"], [2, 4, 16], scheme)
        for name in ("a", "b"):
            assert torch.equal(
                errors[name], quantization_errors(weights[name], [2, 4, 16], scheme=scheme)
            )


def test_unsigned_codes_pack_and_unpack() -> None:
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        codes = rng.integers(0, 2**bits, size=101)
        packed = pack_codes(codes, bits, signed=False)
        assert packed.size == (101 * bits + 7) // 8
        back = unpack_codes(packed, bits, 101, signed=False)
        assert back.dtype == np.uint8 and np.array_equal(back, codes)
        with pytest.raises(ValueError, match="codes must lie"):
            pack_codes(np.array([2**bits]), bits, signed=False)


def test_costs_count_group_scales_and_zero_points() -> None:
    fc = LayerInfo("fc.weight", "linear", (10, 256), 2560, 10, 2560)
    assert fc.storage_bits(4, QuantScheme()) == 2560 * 4 + 10 * 16
    assert fc.storage_bits(4, QuantScheme(group_size=128)) == 2560 * 4 + 20 * 16
    assert fc.storage_bits(4, QuantScheme(group_size=64, symmetric=False)) == (
        2560 * 4 + 40 * (16 + 8)
    )
    odd = LayerInfo("odd.weight", "linear", (10, 100), 1000, 10, 1000)  # 100 % 32 != 0
    assert odd.storage_bits(3, QuantScheme(group_size=32)) == 1000 * 3 + 10 * 16
    scheme = QuantScheme(group_size=32, symmetric=False)
    costs, _ = budget_constraint(Budget("size", 1e6), [fc, odd], [2, 16], scheme=scheme)
    assert costs.tolist() == [
        [fc.storage_bits(2, scheme) / 8, 2560 * 2.0],
        [odd.storage_bits(2, scheme) / 8, 1000 * 2.0],
    ]


def test_spec_granularity_and_symmetry() -> None:
    spec = JobSpec(budgets=["avg-bits=4"], granularity=128, symmetric=False)
    assert spec.scheme == QuantScheme(group_size=128, symmetric=False)
    assert JobSpec.from_dict(spec.to_dict()).scheme == spec.scheme
    assert spec.sensitivity_settings(has_eval_data=True)["scheme"] == spec.scheme.to_dict()
    default = JobSpec(budgets=["avg-bits=4"])
    assert default.scheme == QuantScheme() and "scheme" not in default.sensitivity_settings(
        has_eval_data=True
    )
    for bad in ({"granularity": 100}, {"granularity": "group"}, {"symmetric": "no"}):
        with pytest.raises(SpecError):
            JobSpec(budgets=["avg-bits=4"], **bad)
    import argparse

    parser = argparse.ArgumentParser()
    add_spec_arguments(parser, ["budgets", "granularity", "symmetric"])
    args = parser.parse_args(["--budget", "avg-bits=3", "--granularity", "64", "--no-symmetric"])
    assert spec_from_args(args).scheme == QuantScheme(group_size=64, symmetric=False)


class _Wide(nn.Module):
    """Input sizes 64 (2 groups of 32), 32 (not above the group: per channel), 96 (3 groups),
    and a convolution of Cin*k = 8*3*3 = 72 (not divisible by 32: per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 96)
        self.fc3 = nn.Linear(96, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)[:, :64]
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def grouped_asymmetric_spec() -> JobSpec:
    """A job with scales per 32 input columns, zero points and one fine-tuning epoch."""
    return JobSpec(
        budgets=["avg-bits=4"],
        bits=[2, 4, 8],
        granularity=32,
        symmetric=False,
        batch_size=16,
        finetune=FinetuneSpec(epochs=1, batch_size=8, lr=1e-3),
    )


def test_groupwise_asymmetric_job_round_trips_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(48, 8, 4, 4)
    data = CalibrationData(inputs=[x], labels=torch.randint(0, 5, (48,)))
    model_bytes = save_bytes(_Wide().eval(), (x[:2],), "script")
    spec = grouped_asymmetric_spec()
    finetune = spec.finetune
    result = quantize_model(model_bytes, data, spec, tmp_path / "job", eval_source=data)
    assert result.sensitivity.scheme == spec.scheme
    ck = load_packed_checkpoint(result.out_dir)
    groups = {
        n: (1 if layer.scales.dim() == 1 else layer.scales.shape[1])
        for n, layer in ck.layers.items()
    }
    assert groups == {"conv.weight": 1, "fc1.weight": 2, "fc2.weight": 1, "fc3.weight": 3}
    scheme = result.report["scheme"]
    assert scheme == {
        "group_size": 32,
        "symmetric": False,
        "per_channel_layers": ["conv.weight", "fc2.weight"],
    }
    for layer in ck.layers.values():
        assert layer.zeros is not None and layer.zeros.shape == layer.scales.shape
    fresh = load_model(model_bytes)
    restore_into(fresh, ck)
    exported = dict(stock_load(result.out_dir / "model.pt", "script").named_parameters())
    for name, p in fresh.named_weights().items():
        assert torch.equal(p.detach(), exported[name].detach()), name
        if name in ck.layers:
            assert torch.equal(p.detach(), ck.layers[name].dequantized())
    raw = (result.out_dir / "model.mpq.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    predicted = result.report["sizes"]["predicted_bytes"]
    assert 0 <= len(raw) - 8 - header - predicted < len(ck.layers)
    # A stored table is not reused for another scheme.
    other = JobSpec(budgets=["avg-bits=4"], bits=[2, 4, 8], batch_size=16, finetune=finetune)
    with pytest.raises(SpecError, match="scheme"):
        quantize_model(
            model_bytes,
            data,
            other,
            tmp_path / "again",
            eval_source=data,
            sensitivity=result.sensitivity,
        )


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_ste_passes_the_gradient_exactly_where_rounding_does_not_clip(
    scheme: QuantScheme,
) -> None:
    w = _weight((6, 96), 7, heavy=True)
    scales, zeros = choose_params_many(w, [3], scheme)  # MSE clipping: some weights clip
    s, z = scales[0], None if zeros is None else zeros[0]
    inside = ste_mask(w, s, 3, z)
    rows = s.numel()  # one row of the weight per scale
    err = (dequantize(quantize(w, s, 3, z), s, zeros=z) - w).reshape(rows, -1).abs()
    clipped = err > s.reshape(rows, 1) * (0.5 + 1e-4)  # more than half a step off: clipped
    assert bool(clipped.any()) and bool((~clipped).any())
    assert torch.equal(inside.reshape(s.numel(), -1), ~clipped)
