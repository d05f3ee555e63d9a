"""16 bits as a candidate width: the layer stays a 16-bit float, at params*16 bits."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch

from mpq_core.budgets import Budget, budget_constraint
from mpq_core.errors import SpecError
from mpq_core.intake import load_model
from mpq_core.layers import LayerInfo
from mpq_core.packed_checkpoint import (
    load_packed_checkpoint,
    restore_into,
    save_packed_checkpoint,
)
from mpq_core.pipeline import quantize_model
from mpq_core.quant_primitives import fake_quantize, qmax, quantization_errors
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.conftest import save_bytes, stock_load, zoo_data, zoo_inputs, zoo_module


def test_spec_accepts_16_and_no_other_width_above_8() -> None:
    assert JobSpec(budgets=["avg-bits=4"], bits=[16, 2, 4]).bits == [2, 4, 16]
    for bad in ([2, 9], [4, 15], [4, 32]):
        with pytest.raises(SpecError, match="16"):
            JobSpec(budgets=["avg-bits=4"], bits=bad)


def test_cost_at_16_bits_is_the_16_bit_weight_without_scales() -> None:
    fc = LayerInfo("fc.weight", "linear", (10, 30), 300, 10, 300)
    assert fc.storage_bits(16) == 300 * 16
    assert fc.storage_bits(4) == 300 * 4 + 10 * 16
    costs, _ = budget_constraint(Budget("size", 1e6), [fc], [4, 16])
    assert costs.tolist() == [[fc.storage_bits(4) / 8, 300 * 2.0]]


def test_error_at_16_bits_is_the_rounding_to_the_16_bit_dtype() -> None:
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    errors = quantization_errors(w, [2, 16])
    assert torch.equal(errors[1], w.half().float() - w)
    assert 0 < float(errors[1].abs().max()) < 1e-3 * float(errors[0].abs().max())
    wb = w.bfloat16()  # a bfloat16 weight is kept as it is: no error at all
    assert torch.equal(fake_quantize(wb, 16), wb)
    assert not bool(quantization_errors(wb, [2, 16])[1].any())
    with pytest.raises(ValueError, match="bits"):
        qmax(16)  # there are no integer codes at 16 bits


def test_sensitive_layer_kept_at_16_bits_and_checkpoint_round_trips(tmp_path: Path) -> None:
    name = "cnn"
    model_bytes = save_bytes(zoo_module(name), tuple(t[:2] for t in zoo_inputs(name, 2)), "script")
    data, test = zoo_data(name, 48), zoo_data(name, 16, seed=7)
    finetune = FinetuneSpec(epochs=1, batch_size=8, lr=1e-3)
    spec = JobSpec(budgets=["avg-bits=4"], bits=[2, 4, 16], batch_size=16, finetune=finetune)
    first = quantize_model(model_bytes, data, spec, tmp_path / "a", eval_source=test)
    table = first.sensitivity
    assert 16 in table.bits
    # The layer whose move from 4 to 16 bits saves the most predicted loss per bit paid; a
    # budget that affords all layers at 4 plus exactly that move (the generous budget).
    gain = [
        (table.omega[i][1] - table.omega[i][2]) / (layer.params * 12)
        for i, layer in enumerate(table.layers)
    ]
    top = max(range(len(gain)), key=gain.__getitem__)
    params = [layer.params for layer in table.layers]
    avg = (4 * sum(params) + 12 * params[top]) / sum(params)
    spec = JobSpec(
        budgets=[f"avg-bits={avg + 1e-6}"], bits=[2, 4, 16], batch_size=16, finetune=finetune
    )
    result = quantize_model(
        model_bytes, data, spec, tmp_path / "b", eval_source=test, sensitivity=table
    )
    alloc = result.report["allocation"]
    assert alloc[table.layers[top].name] == 16, (alloc, gain)
    # The packed checkpoint: the 16-bit layer as float16 values, restored bit-exactly into a
    # fresh model, equal to the exported drop-in model, and as large as predicted.
    ck = load_packed_checkpoint(result.out_dir)
    kept = ck.layers[table.layers[top].name]
    assert kept.bits == 16 and kept.codes.dtype == torch.float16 and kept.scales.numel() == 0
    fresh = load_model(model_bytes)
    restore_into(fresh, ck)
    exported = dict(stock_load(result.out_dir / "model.pt", "script").named_parameters())
    for n, p in fresh.named_weights().items():
        assert torch.equal(p.detach(), exported[n].detach()), n
    raw = (result.out_dir / "model.mpq.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    predicted = result.report["sizes"]["predicted_bytes"]
    assert 0 <= len(raw) - 8 - header - predicted < len(ck.layers)
    restored = fresh.named_weights()[kept.name].detach()
    assert torch.equal(restored, kept.codes.float())  # the fine-tuned weight, rounded to fp16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_with_16_bit_layers_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    net = net.to(dtype)
    model = load_model(save_bytes(net, (torch.randn(2, 8, dtype=dtype),), "trace"))
    names = ["0.weight", "2.weight"]
    bits = {names[0]: 16, names[1]: 3}
    layers = quantize_weights(model, bits)
    assert layers[names[0]].codes.dtype == (
        torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    )
    size = save_packed_checkpoint(tmp_path, model, layers)
    ck = load_packed_checkpoint(tmp_path)
    assert {n: layer.bits for n, layer in ck.layers.items()} == bits
    for n, layer in layers.items():
        assert torch.equal(ck.layers[n].codes, layer.codes)
        assert torch.equal(ck.layers[n].scales, layer.scales)
    fresh = load_model(save_bytes(net, (torch.randn(2, 8, dtype=dtype),), "trace"))
    restore_into(fresh, ck)
    apply_weights(model, layers)
    for n, p in model.named_weights().items():
        assert torch.equal(fresh.named_weights()[n], p), n
    if dtype == torch.bfloat16:  # nothing rounded: the kept layer is the weight itself
        assert torch.equal(model.named_weights()[names[0]], net[0].weight)
    params = {n: p.numel() for n, p in model.named_weights().items()}
    codes = 2 * params[names[0]] + math.ceil(3 * params[names[1]] / 8) + 2 * 3
    assert size > codes
