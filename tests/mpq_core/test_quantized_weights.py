from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from mpq_core.intake import LoadedModel, load_model
from mpq_core.quant_primitives import choose_scales, dequantize, qmax, quantize
from mpq_core.quantized_weights import QuantizedLayer, apply_weights, quantize_weights
from tests.conftest import zoo_inputs


def _bits(model: LoadedModel) -> dict[str, int]:
    names = [n for n, p in model.named_weights().items() if p.dim() >= 2]
    return {n: 2 + i % 7 for i, n in enumerate(names)}


@pytest.mark.parametrize(("name", "fmt"), [("cnn", "script"), ("text", "export")])
def test_quantize_weights_matches_quantizer(
    zoo_bytes: Callable[[str, str], bytes], name: str, fmt: str
) -> None:
    model = load_model(zoo_bytes(name, fmt))
    bits = _bits(model)
    layers = quantize_weights(model, bits)
    weights = model.named_weights()
    assert list(layers) == list(bits)
    for n, layer in layers.items():
        w = weights[n].detach()
        assert layer.name == n and layer.bits == bits[n]
        assert layer.codes.dtype == torch.int8 and layer.codes.shape == w.shape
        assert layer.scales.dtype == torch.float32 and layer.scales.shape == (w.shape[0],)
        assert torch.equal(layer.scales.half().float(), layer.scales)
        q = qmax(layer.bits)
        assert int(layer.codes.abs().max()) <= q
        scales = choose_scales(w, layer.bits)
        assert torch.equal(layer.scales, scales)
        assert torch.equal(layer.codes, quantize(w, scales, layer.bits))
        assert torch.equal(layer.dequantized(), dequantize(layer.codes, layer.scales))
        assert layer.dequantized(torch.float16).dtype == torch.float16


def test_given_scales_are_used_and_rounded_to_fp16(zoo_bytes: Callable[[str, str], bytes]) -> None:
    model = load_model(zoo_bytes("mlp", "script"))
    w = model.named_weights()["net.0.weight"].detach()
    given = w.abs().amax(dim=1) / 7 + 1e-4  # not fp16-representable in general
    layers = quantize_weights(model, {"net.0.weight": 4}, scales={"net.0.weight": given})
    layer = layers["net.0.weight"]
    assert torch.equal(layer.scales, given.half().float())
    assert torch.equal(layer.codes, quantize(w, given.half().float(), 4))
    with pytest.raises(ValueError, match="scales"):
        quantize_weights(model, {"net.0.weight": 4}, scales={"net.0.weight": given[:3]})
    with pytest.raises(ValueError, match="positive"):
        quantize_weights(model, {"net.0.weight": 4}, scales={"net.0.weight": given * 0})


def test_bad_names_and_bits_raise(zoo_bytes: Callable[[str, str], bytes]) -> None:
    model = load_model(zoo_bytes("mlp", "script"))
    with pytest.raises(KeyError, match="no parameter"):
        quantize_weights(model, {"nope.weight": 4})
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(model, {"net.0.weight": 9})
    layer = QuantizedLayer("nope", 4, torch.zeros(2, 2, dtype=torch.int8), torch.ones(2))
    with pytest.raises(KeyError):
        apply_weights(model, {"nope": layer})
    layer = QuantizedLayer("net.0.weight", 4, torch.zeros(2, 2, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        apply_weights(model, {"net.0.weight": layer})


@pytest.mark.parametrize("fmt", ["script", "export"])
def test_apply_weights_writes_dequantized_values(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    model = load_model(zoo_bytes("cnn", fmt))
    inputs = zoo_inputs("cnn", 3)
    before = model(*inputs)
    floats = {n: p.detach().clone() for n, p in model.named_weights().items()}
    layers = quantize_weights(model, _bits(model))
    apply_weights(model, layers)
    for n, p in model.named_weights().items():
        if n in layers:
            assert torch.equal(p.detach(), layers[n].dequantized())
        else:
            assert torch.equal(p.detach(), floats[n])
    assert not torch.equal(model(*inputs), before)
    # The saved model (torch.export: the program shares the module's storage) has them too.
    buf = io.BytesIO()
    model.save(buf)
    reloaded = load_model(buf.getvalue())
    for n, p in reloaded.named_weights().items():
        if n in layers:
            assert torch.equal(p.detach(), layers[n].dequantized())
