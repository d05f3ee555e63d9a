from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_core.errors import ModelFormatError
from mpq_core.export import (
    CHECKPOINT_NAME,
    load_packed_checkpoint,
    restore_into,
    save_packed_checkpoint,
    save_quantized_model,
)
from mpq_core.intake import LoadedModel, load_model
from mpq_core.quantized import QuantizedLayer, apply_weights, quantize_weights
from tests.conftest import save_bytes, zoo_inputs


class TiedLM(nn.Module):
    """An embedding whose weight is also the output projection's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids)))).mean(dim=1)


class WideMLP(nn.Module):
    """About 0.92M parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1024, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
            nn.LayerNorm(10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _tied_inputs(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, 20, (n, 5), generator=torch.Generator().manual_seed(3))]


@pytest.fixture(scope="module")
def archive(zoo_bytes: Callable[[str, str], bytes]) -> Callable[[str, str], bytes]:
    """Zoo archives plus ``tied`` (TiedLM), built once."""
    cache: dict[tuple[str, str], bytes] = {}

    def get(name: str, fmt: str) -> bytes:
        if name != "tied":
            return zoo_bytes(name, fmt)
        if (name, fmt) not in cache:
            torch.manual_seed(0)
            cache[(name, fmt)] = save_bytes(TiedLM().eval(), tuple(_tied_inputs(2)), fmt)
        return cache[(name, fmt)]

    return get


def _inputs(name: str) -> list[torch.Tensor]:
    return _tied_inputs() if name == "tied" else zoo_inputs(name, 3)


def _bits(model: LoadedModel) -> dict[str, int]:
    """Every matrix-like weight, widths 2..8 in turn."""
    names = [n for n, p in model.named_weights().items() if p.dim() >= 2]
    return {n: 2 + i % 7 for i, n in enumerate(names)}


def _predicted_size(model: LoadedModel, layers: dict[str, QuantizedLayer]) -> float:
    """The ``size`` budget's cost model (mpq_core.budgets.achieved)."""
    total = 0.0
    for name, p in model.named_weights().items():
        if name in layers:
            total += (p.numel() * layers[name].bits + p.shape[0] * 16) / 8
        else:
            total += 4 * p.numel()
    return total


CASES = [
    ("cnn", "script"),
    ("cnn", "export"),
    ("text", "script"),
    ("text", "export"),
    ("tied", "script"),
    ("tied", "export"),
]


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_checkpoint_round_trip_is_bit_exact(
    archive: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    data = archive(name, fmt)
    source = load_model(data)
    layers = quantize_weights(source, _bits(source))
    assert layers
    size = save_packed_checkpoint(tmp_path, source, layers, metadata={"job": "j1", "n": 2})
    path = tmp_path / CHECKPOINT_NAME
    assert size == path.stat().st_size

    checkpoint = load_packed_checkpoint(path)
    assert checkpoint.metadata == {"job": "j1", "n": 2}
    assert list(checkpoint.layers) == list(layers)
    for n, layer in layers.items():
        got = checkpoint.layers[n]
        assert got.bits == layer.bits
        assert torch.equal(got.codes, layer.codes)
        assert torch.equal(got.scales, layer.scales)
    float_names = {n for n in source.named_weights() if n not in layers}
    assert set(checkpoint.float_params) == float_names
    if name == "tied":  # the tied weight is stored once, quantized; no float copy of it
        assert float_names == {"mix.bias"}

    simulated = load_model(data)
    apply_weights(simulated, quantize_weights(simulated, _bits(simulated)))
    restored = load_model(data)
    with torch.no_grad():  # scramble everything, float parameters included
        for p in restored.module.parameters():
            p.add_(1.0)
    restore_into(restored, checkpoint)
    sim_params = dict(simulated.module.named_parameters())
    restored_params = dict(restored.module.named_parameters())
    assert sim_params.keys() == restored_params.keys()
    for n, p in sim_params.items():
        assert torch.equal(p, restored_params[n]), n
    inputs = _inputs(name)
    assert torch.equal(simulated(*inputs), restored(*inputs))


def test_size_matches_prediction_for_a_1m_parameter_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_model(save_bytes(WideMLP().eval(), (torch.randn(2, 1024),), "script"))
    assert 900_000 < sum(p.numel() for p in model.named_weights().values()) < 1_100_000
    layers = quantize_weights(model, _bits(model))
    size = save_packed_checkpoint(tmp_path / "m.mpq.safetensors", model, layers)
    predicted = _predicted_size(model, layers)
    assert abs(size - predicted) / predicted < 0.01
    assert size >= predicted


@pytest.mark.parametrize(
    ("name", "fmt"), [("cnn", "script"), ("text", "export"), ("mlp", "script")]
)
def test_tiny_models_pay_only_the_header(
    archive: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    model = load_model(archive(name, fmt))
    layers = quantize_weights(model, _bits(model))
    size = save_packed_checkpoint(tmp_path / "c.safetensors", model, layers)
    header = int.from_bytes((tmp_path / "c.safetensors").read_bytes()[:8], "little")
    predicted = _predicted_size(model, layers)
    # Beyond the prediction: the 8-byte length, the JSON header, < 1 byte of padding per layer.
    assert 0 <= size - 8 - header - predicted < len(layers)
    assert header < 1500


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_quantized_model_loads_with_stock_torch(
    archive: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    data = archive(name, fmt)
    model = load_model(data)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    layers = quantize_weights(model, _bits(model))
    save_quantized_model(model, layers, tmp_path)
    path = tmp_path / ("model.pt2" if fmt == "export" else "model.pt")
    assert path.is_file()

    after = dict(model.module.named_parameters())  # the caller's model keeps its float weights
    for n, p in before.items():
        assert torch.equal(after[n], p), n

    inputs = _inputs(name)
    simulated = load_model(data)
    apply_weights(simulated, layers)
    expected = simulated(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "export":
            stock = torch.export.load(str(path)).module()
        else:
            stock = torch.jit.load(str(path))
    assert torch.equal(stock(*inputs), expected)
    assert not torch.equal(model(*inputs), expected)


def _saved(archive: Callable[[str, str], bytes], tmp_path: Path) -> Path:
    model = load_model(archive("cnn", "script"))
    path = tmp_path / CHECKPOINT_NAME
    save_packed_checkpoint(path, model, quantize_weights(model, _bits(model)))
    return path


def test_truncated_checkpoints_raise(archive: Callable[[str, str], bytes], tmp_path: Path) -> None:
    path = _saved(archive, tmp_path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    for cut in (0, 4, 8, 100, 8 + header, 8 + header + 10, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="not a valid mpq packed checkpoint") as exc:
            load_packed_checkpoint(bad)
        assert exc.value.code == "checkpoint_corrupt"


def test_corrupted_checkpoints_raise(archive: Callable[[str, str], bytes], tmp_path: Path) -> None:
    path = _saved(archive, tmp_path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])

    def rewrite(meta: dict[str, str]) -> bytes:
        h = dict(header, __metadata__=meta)
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + data[8 + header_len :]

    meta = header["__metadata__"]
    flipped = bytearray(data)
    flipped[-5] ^= 0x10  # a bit of a float parameter
    layers = json.loads(meta["layers"])
    first = next(iter(layers))
    cases = {
        "flipped": bytes(flipped),
        "garbage": b"\x00" * 8 + b"not safetensors at all",
        "huge_header": (2**40).to_bytes(8, "little") + data[8:],
        "format": rewrite(dict(meta, format="other")),
        "version": rewrite(dict(meta, schema_version="99")),
        "layers_json": rewrite(dict(meta, layers="{not json")),
        "bits": rewrite(dict(meta, layers=json.dumps({first: dict(layers[first], bits=9)}))),
        "shape": rewrite(
            dict(meta, layers=json.dumps({first: dict(layers[first], shape=[4, 1, 3, 4])}))
        ),
        "no_meta": rewrite({}),
    }
    for label, content in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ModelFormatError, match="not a valid mpq packed checkpoint"):
            load_packed_checkpoint(bad)
    with pytest.raises(ModelFormatError, match="cannot be read"):
        load_packed_checkpoint(tmp_path / "missing.safetensors")
    assert load_packed_checkpoint(tmp_path).layers  # a directory holding the checkpoint


def test_restore_into_another_model_raises(
    archive: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    checkpoint = load_packed_checkpoint(_saved(archive, tmp_path))
    other = load_model(archive("mlp", "script"))
    with pytest.raises(ModelFormatError, match="does not fit") as exc:
        restore_into(other, checkpoint)
    assert exc.value.code == "checkpoint_mismatch"
    cnn = load_model(archive("cnn", "script"))
    del checkpoint.float_params["fc.bias"]
    with pytest.raises(ModelFormatError, match=r"fc\.bias"):
        restore_into(cnn, checkpoint)


def test_non_fp16_scales_are_refused(archive: Callable[[str, str], bytes], tmp_path: Path) -> None:
    model = load_model(archive("mlp", "script"))
    layer = quantize_weights(model, {"net.0.weight": 4})["net.0.weight"]
    layer.scales = layer.scales + 1e-7
    with pytest.raises(ValueError, match="fp16"):
        save_packed_checkpoint(tmp_path / "x.safetensors", model, {"net.0.weight": layer})
    assert not list(tmp_path.iterdir())
