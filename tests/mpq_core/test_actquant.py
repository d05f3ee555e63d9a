"""Activation quantization: encodings, calibration, and the dispatcher-level fake quantizer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from mpq_core.actquant import ActEncoding, ActivationQuantizer, calibrate_activations
from mpq_core.evaluate import evaluate, model_outputs
from mpq_core.intake import LoadedModel, load_model
from tests.conftest import zoo_data, zoo_module

FORMATS = ["script", "export"]
MLP_LAYERS = ["net.0.weight", "net.2.weight", "net.4.weight"]
CNN_LAYERS = ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]


def _load(zoo_bytes: Callable[[str, str], bytes], name: str, fmt: str) -> LoadedModel:
    return load_model(zoo_bytes(name, fmt))


def _grid_codes(enc: ActEncoding, y: torch.Tensor) -> torch.Tensor:
    """The integer codes behind fake-quantized values ``y``; asserts they are integers."""
    q = y.double() / enc.scale
    assert torch.allclose(q, q.round(), atol=1e-4), "values are not on the encoding's grid"
    return q.round()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_encoding_codes_within_range(bits: int, signed: bool) -> None:
    enc = ActEncoding(bits=bits, scale=0.037, signed=signed)
    if signed:
        assert (enc.qmin, enc.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    else:
        assert (enc.qmin, enc.qmax) == (0, 2**bits - 1)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * 20  # far past the clip
    codes = _grid_codes(enc, enc.fake_quantize(x))
    assert int(codes.min()) == enc.qmin and int(codes.max()) == enc.qmax  # clipped, not wrapped
    inside = (x >= enc.qmin * enc.scale) & (x <= enc.qmax * enc.scale)
    # Inside the range the error is at most half a step.
    err = (enc.fake_quantize(x) - x)[inside].abs()
    assert float(err.max()) <= enc.scale / 2 + 1e-6
    d = enc.to_dict()
    assert d["min"] == pytest.approx(enc.qmin * enc.scale)
    assert d["max"] == pytest.approx(enc.qmax * enc.scale)
    assert d["zero_point"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_calibration_signedness_follows_the_activation(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    mlp = _load(zoo_bytes, "mlp", fmt)
    enc = calibrate_activations(mlp, zoo_data("mlp", 24), MLP_LAYERS, 8, batch_size=8)
    assert set(enc) == set(MLP_LAYERS)
    assert enc["net.0.weight"].signed  # raw input
    assert not enc["net.2.weight"].signed  # after ReLU
    assert enc["net.4.weight"].signed  # after Tanh
    assert all(e.bits == 8 and e.scale > 0 for e in enc.values())
    cnn = _load(zoo_bytes, "cnn", fmt)
    enc = calibrate_activations(cnn, zoo_data("cnn", 16), CNN_LAYERS, 4, batch_size=8)
    assert set(enc) == set(CNN_LAYERS)
    assert enc["conv1.weight"].signed
    assert not any(enc[n].signed for n in ("conv2.weight", "conv3.weight", "fc.weight"))
    assert all(e.bits == 4 for e in enc.values())


def test_calibration_range_covers_the_observed_activations(
    zoo_bytes: Callable[[str, str], bytes],
) -> None:
    """The clipping is chosen from a grid of 0.3..1.0 times the largest observed magnitude."""
    mlp = _load(zoo_bytes, "mlp", "script")
    data = zoo_data("mlp", 24)
    enc = calibrate_activations(mlp, data, ["net.0.weight"], 8)["net.0.weight"]
    amax = float(data.inputs[0].abs().max())
    assert 0.3 * amax - 1e-5 <= enc.qmax * enc.scale <= amax + 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_calibration_encodes_every_linear_layer_but_not_embeddings(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    """TinyTextEncoder: emb (embedding) gets no encoding; the attention projections, ff and head
    (all linear) each get one."""
    model = _load(zoo_bytes, "text", fmt)
    layers = [
        "emb.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "ff.weight",
        "head.weight",
    ]
    enc = calibrate_activations(model, zoo_data("text", 16), layers, 8, batch_size=8)
    assert "emb.weight" not in enc
    # The attention projections are encoded too: calibration must keep scripted
    # nn.MultiheadAttention off its fused fast path, which would hide them.
    assert set(enc) == set(layers[1:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_first_linear_input_is_fake_quantized(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    """Only net.0 encoded: the output equals the float model fed the fake-quantized input."""
    model = _load(zoo_bytes, "mlp", fmt)
    x = zoo_data("mlp", 12).inputs[0]
    enc = ActEncoding(bits=3, scale=0.4, signed=True)
    aq = ActivationQuantizer(model.named_weights(), {"net.0.weight": enc})
    with torch.no_grad():
        with aq:
            got = model(x)
        want = model(enc.fake_quantize(x))
        plain = model(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)  # the 3-bit grid really did something


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_quantized_layer_input_is_on_its_grid(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    """All three MLP layers encoded: matches a layer-by-layer eager computation."""
    model = _load(zoo_bytes, "mlp", fmt)
    data = zoo_data("mlp", 20)
    encs = calibrate_activations(model, data, MLP_LAYERS, 4, batch_size=8)
    aq = ActivationQuantizer(model.named_weights(), encs)
    with torch.no_grad():
        with aq:
            got = model(data.inputs[0])
        ref = zoo_module("mlp").net  # the same seeded weights, run eagerly
        h = data.inputs[0]
        for i, act in ((0, torch.relu), (2, torch.tanh), (4, None)):
            layer = ref[i]
            h_q = encs[f"net.{i}.weight"].fake_quantize(h)
            _grid_codes(encs[f"net.{i}.weight"], h_q)
            h = F.linear(h_q, layer.weight, layer.bias)
            h = act(h) if act is not None else h
    assert torch.allclose(got, h, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_input_is_fake_quantized(zoo_bytes: Callable[[str, str], bytes], fmt: str) -> None:
    model = _load(zoo_bytes, "cnn", fmt)
    x = zoo_data("cnn", 8).inputs[0]
    enc = ActEncoding(bits=2, scale=0.5, signed=True)
    aq = ActivationQuantizer(model.named_weights(), {"conv1.weight": enc})
    with torch.no_grad():
        with aq:
            got = model(x)
        want = model(enc.fake_quantize(x))
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_attention_projection_input_is_fake_quantized_in_evaluation(
    zoo_bytes: Callable[[str, str], bytes], fmt: str
) -> None:
    """A coarse encoding on attn.in_proj_weight must change the evaluated outputs."""
    model = _load(zoo_bytes, "text", fmt)
    data = zoo_data("text", 8)
    aq = ActivationQuantizer(
        model.named_weights(), {"attn.in_proj_weight": ActEncoding(bits=2, scale=1.0, signed=True)}
    )
    plain = model_outputs(model, data)
    quant = model_outputs(model, data, act_quant=aq)
    # The quantizer reaches the attention projections in evaluation: scripted
    # nn.MultiheadAttention must not take its fused fast path, where the outputs would not change.
    assert float((plain - quant).abs().max()) > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("name", "layers"), [("mlp", MLP_LAYERS), ("cnn", CNN_LAYERS)])
def test_eight_bit_changes_outputs_slightly_two_bit_much_more(
    zoo_bytes: Callable[[str, str], bytes], fmt: str, name: str, layers: list[str]
) -> None:
    model = _load(zoo_bytes, name, fmt)
    data = zoo_data(name, 24)
    reference = model_outputs(model, data)
    metrics = {}
    for bits in (8, 2):
        encs = calibrate_activations(model, data, layers, bits, batch_size=8)
        aq = ActivationQuantizer(model.named_weights(), encs)
        metrics[bits] = evaluate(model, data, reference, act_quant=aq)
    assert metrics[8].cosine > 0.99
    assert 1 - metrics[2].cosine > 10 * (1 - metrics[8].cosine)
    assert metrics[8].sqnr_db > metrics[2].sqnr_db + 20
    if name == "mlp":  # the CNN's output is dominated by its bias: cosine stays high
        assert metrics[2].cosine < 0.95
    # The quantizer leaves the model itself untouched.
    assert torch.equal(model_outputs(model, data), reference)
