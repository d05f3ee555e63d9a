from __future__ import annotations

import base64
import io
import json
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from safetensors.numpy import load as st_load
from torch import nn

from mpq_core.dropin_model import save_quantized_model
from mpq_core.errors import ModelFormatError
from mpq_core.intake import LoadedModel, load_model
from mpq_core.packed_checkpoint import (
    CHECKPOINT_NAME,
    load_packed_checkpoint,
    restore_into,
    save_packed_checkpoint,
)
from mpq_core.packing import pack_codes
from mpq_core.quantized_weights import QuantizedLayer, apply_weights, quantize_weights
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


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn_q = nn.Linear(d, d)
        self.attn_k = nn.Linear(d, d)
        self.attn_v = nn.Linear(d, d)
        self.attn_o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn_o(torch.tanh(self.attn_q(h) * self.attn_k(h)) * self.attn_v(h))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class ManyParams(nn.Module):
    """51 parameter tensors with realistic, long qualified names."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d, bias=False)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _header(path: Path) -> tuple[int, dict[str, object]]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _table(meta: dict[str, str]) -> dict[str, list[list[Any]]]:
    """Decode the ``table`` metadata with the standard library alone."""
    table: dict[str, list[list[Any]]] = json.loads(zlib.decompress(base64.b85decode(meta["table"])))
    return table


def _encode(table: object) -> str:
    return base64.b85encode(zlib.compress(json.dumps(table).encode())).decode()


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


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_restore_into_what_torch_load_returns(
    archive: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    """A user restores into ``torch.jit.load(...)`` / ``torch.export.load(...)`` itself, no
    mpq loader in between, and runs it as torch gives it to them."""
    data = archive(name, fmt)
    source = load_model(data)
    save_packed_checkpoint(tmp_path, source, quantize_weights(source, _bits(source)))
    checkpoint = load_packed_checkpoint(tmp_path / CHECKPOINT_NAME)
    simulated = load_model(data)
    apply_weights(simulated, quantize_weights(simulated, _bits(simulated)))
    inputs = _inputs(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        if fmt == "script":
            plain = torch.jit.load(io.BytesIO(data))
            restore_into(plain, checkpoint)
            got = plain(*inputs)
        else:
            program = torch.export.load(io.BytesIO(data))
            restore_into(program, checkpoint)
            got = program.module()(*inputs)  # a module made after the restore sees it
    want = simulated(*inputs)
    assert torch.equal(got, want)
    assert not torch.equal(load_model(data)(*inputs), want)  # the restore changed the model


def test_restore_into_something_else_says_what_it_takes() -> None:
    with pytest.raises(TypeError, match=r"torch\.jit\.load"):
        restore_into("model.pt", None)  # type: ignore[arg-type]


def test_size_matches_prediction_for_a_1m_parameter_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_model(save_bytes(WideMLP().eval(), (torch.randn(2, 1024),), "script"))
    assert 900_000 < sum(p.numel() for p in model.named_weights().values()) < 1_100_000
    layers = quantize_weights(model, _bits(model))
    size = save_packed_checkpoint(tmp_path / "m.mpq.safetensors", model, layers)
    predicted = _predicted_size(model, layers)
    assert (size - predicted) / predicted < 0.003
    assert size >= predicted


def test_header_of_a_50_parameter_model_is_under_1000_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_model(save_bytes(ManyParams().eval(), (torch.randn(2, 8),), "script"))
    assert len(model.named_weights()) == 51
    layers = quantize_weights(model, _bits(model))
    path = tmp_path / "c.safetensors"
    size = save_packed_checkpoint(path, model, layers, metadata={"model_sha256": "0" * 64})
    header, _ = _header(path)
    predicted = _predicted_size(model, layers)
    assert 0 <= size - 8 - header - predicted < len(layers)
    assert header < 1000


def test_layout_is_three_tensors_and_a_self_describing_table(
    archive: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    model = load_model(archive("text", "script"))
    layers = quantize_weights(model, _bits(model))
    path = tmp_path / CHECKPOINT_NAME
    save_packed_checkpoint(path, model, layers, metadata={"job": "j1"})
    _, header = _header(path)
    meta = header.pop("__metadata__")
    assert isinstance(meta, dict)
    assert set(meta) == {"format", "schema_version", "table", "crc32", "mpq"}
    assert (meta["format"], meta["schema_version"]) == ("mpq.packed", "2")
    assert json.loads(meta["mpq"]) == {"job": "j1"}
    assert {k: v["dtype"] for k, v in header.items()} == {"q": "U8", "s": "F16", "f": "F32"}  # type: ignore[index]

    # Names, bits and shapes come from the file alone, in storage order.
    table = _table(meta)
    weights = model.named_weights()
    assert table["layers"] == [[n, q.bits, list(q.shape)] for n, q in layers.items()]
    assert table["floats"] == [[n, list(p.shape)] for n, p in weights.items() if n not in layers]

    # Offsets follow from the sizes: each layer's codes start at a byte boundary.
    tensors = st_load(path.read_bytes())
    qo = so = fo = 0
    for name, bits, shape in table["layers"]:
        assert isinstance(bits, int) and isinstance(shape, list)
        nbytes = -(-int(np.prod(shape)) * bits // 8)
        assert bytes(tensors["q"][qo : qo + nbytes]) == bytes(
            pack_codes(layers[str(name)].codes.numpy(), bits)
        )
        assert np.array_equal(
            tensors["s"][so : so + shape[0]].astype(np.float32), layers[str(name)].scales.numpy()
        )
        qo, so = qo + nbytes, so + shape[0]
    for name, shape in table["floats"]:
        count = int(np.prod(shape))
        want = weights[str(name)].detach().reshape(-1).numpy()
        assert np.array_equal(tensors["f"][fo : fo + count], want)
        fo += count
    assert (qo, so, fo) == (tensors["q"].size, tensors["s"].size, tensors["f"].size)


def test_empty_tensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(6, 2, bias=False)).eval()
    model = load_model(save_bytes(net, (torch.randn(2, 4),), "script"))
    path = tmp_path / CHECKPOINT_NAME
    # Nothing quantized: empty ``q`` and ``s``.
    save_packed_checkpoint(path, model, {})
    ck = load_packed_checkpoint(path)
    assert ck.layers == {} and set(ck.float_params) == set(model.named_weights())
    # Everything quantized: an empty ``f``.
    layers = quantize_weights(model, _bits(model))
    save_packed_checkpoint(path, model, layers)
    ck = load_packed_checkpoint(path)
    assert ck.float_params == {} and list(ck.layers) == list(layers)
    restored = load_model(save_bytes(net, (torch.randn(2, 4),), "script"))
    restore_into(restored, ck)
    for n, layer in layers.items():
        assert torch.equal(restored.named_weights()[n], layer.dequantized())


@pytest.mark.parametrize(
    ("name", "fmt"), [("cnn", "script"), ("text", "export"), ("mlp", "script")]
)
def test_tiny_models_pay_only_the_header(
    archive: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    model = load_model(archive(name, fmt))
    layers = quantize_weights(model, _bits(model))
    size = save_packed_checkpoint(tmp_path / "c.safetensors", model, layers)
    header, _ = _header(tmp_path / "c.safetensors")
    predicted = _predicted_size(model, layers)
    # Beyond the prediction: the 8-byte length, the JSON header, < 1 byte of padding per layer.
    assert 0 <= size - 8 - header - predicted < len(layers)
    assert header < 600


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
    table = _table(meta)
    (name, bits, shape), *rest = table["layers"]
    assert isinstance(shape, list)

    def with_table(**change: object) -> bytes:
        return rewrite(dict(meta, table=_encode(dict(table, **change))))

    flipped = bytearray(data)
    flipped[-5] ^= 0x10  # a bit of the packed codes
    flipped_f = bytearray(data)
    flipped_f[8 + header_len + 3] ^= 0x10  # a bit of a float parameter
    cases = {
        "flipped": (bytes(flipped), "CRC-32"),
        "flipped_float": (bytes(flipped_f), "CRC-32"),
        "garbage": (b"\x00" * 8 + b"not safetensors at all", "not JSON"),
        "huge_header": ((2**40).to_bytes(8, "little") + data[8:], "length is invalid"),
        "format": (rewrite(dict(meta, format="other")), "format"),
        "version": (rewrite(dict(meta, schema_version="99")), "schema_version '99'"),
        "version_1": (rewrite(dict(meta, schema_version="1")), "reads only version 2"),
        "no_version": (rewrite({k: v for k, v in meta.items() if k != "schema_version"}), "None"),
        "no_table": (rewrite({k: v for k, v in meta.items() if k != "table"}), "'table'"),
        "table_not_b85": (rewrite(dict(meta, table="{not b85")), "'table'"),
        "table_not_zlib": (
            rewrite(dict(meta, table=base64.b85encode(b"plain").decode())),
            "'table'",
        ),
        "table_bit_flip": (
            rewrite(dict(meta, table=meta["table"][:20] + "0" + meta["table"][21:])),
            "'table'",
        ),
        "table_not_json": (
            rewrite(dict(meta, table=base64.b85encode(zlib.compress(b"{x")).decode())),
            "'table'",
        ),
        "table_no_floats": (
            rewrite(dict(meta, table=_encode({"layers": table["layers"]}))),
            "'table'",
        ),
        "bits": (with_table(layers=[[name, 9, shape], *rest]), "bits=9"),
        "shape": (with_table(layers=[[name, bits, [4, 1, 3, 4]], *rest]), "calls for"),
        "negative": (with_table(layers=[[name, bits, [-1, *shape[1:]]], *rest]), "'table'"),
        "scalar_layer": (with_table(layers=[[name, bits, []], *rest]), "shape=[]"),
        "dropped_float": (with_table(floats=table["floats"][1:]), "calls for"),
        "twice": (with_table(floats=[[name, [1]], *table["floats"]]), "twice"),
        "no_meta": (rewrite({}), "format is None"),
    }
    for label, (content, why) in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ModelFormatError, match="not a valid mpq packed checkpoint") as exc:
            load_packed_checkpoint(bad)
        assert exc.value.code == "checkpoint_corrupt", label
        assert why in str(exc.value), (label, str(exc.value))
    with pytest.raises(ModelFormatError, match="cannot be read"):
        load_packed_checkpoint(tmp_path / "missing.safetensors")
    assert load_packed_checkpoint(tmp_path).layers  # a directory holding the checkpoint


def test_foreign_tensors_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save as st_save

    meta = {"format": "mpq.packed", "schema_version": "2"}
    meta["table"] = _encode({"layers": [], "floats": [["w", [2]]]})
    good: dict[str, NDArray[Any]] = {
        "q": np.zeros(0, np.uint8),
        "s": np.zeros(0, np.float16),
        "f": np.ones(2, np.float32),
    }
    cases: dict[str, dict[str, NDArray[Any]]] = {
        "extra": dict(good, w=np.ones(2, np.float32)),
        "missing": {k: v for k, v in good.items() if k != "s"},
        "dtype": dict(good, f=np.ones(2, np.float64)),
        "ndim": dict(good, f=np.ones((1, 2), np.float32)),
    }
    for label, tensors in cases.items():
        crc = 0
        for key in sorted(tensors):
            crc = zlib.crc32(key.encode(), crc)
            crc = zlib.crc32(tensors[key].tobytes(), crc)
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(st_save(tensors, metadata=dict(meta, crc32=f"{crc:08x}")))
        with pytest.raises(ModelFormatError, match="tensor") as exc:
            load_packed_checkpoint(bad)
        assert exc.value.code == "checkpoint_corrupt", label
    ok = tmp_path / "ok.safetensors"
    crc = 0
    for key in sorted(good):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(good[key].tobytes(), crc)
    ok.write_bytes(st_save(good, metadata=dict(meta, crc32=f"{crc:08x}")))
    assert torch.equal(load_packed_checkpoint(ok).float_params["w"], torch.ones(2))


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


def test_float_parameters_keep_a_shared_16_bit_dtype_else_float32() -> None:
    from mpq_core.packed_checkpoint import float_storage_dtype

    assert float_storage_dtype({torch.bfloat16}) == torch.bfloat16
    assert float_storage_dtype({torch.float16}) == torch.float16
    assert float_storage_dtype({torch.float16, torch.bfloat16}) == torch.float32  # exact for both
    assert float_storage_dtype({torch.float32}) == torch.float32
    assert float_storage_dtype(set()) == torch.float32
