"""The runtime exports: ``model.compressed.pt2`` runs with stock torch and equals the simulated
quantized model bit for bit; ``model.onnx`` runs in onnxruntime within float rounding of it, its
weights stored as integer codes in the narrowest ONNX container. (Every zoo model goes through
both in tests/mpq_core/test_zoo.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mpq_core import onnx_export, quantize, write_artifacts
from mpq_core.actquant import ActivationQuantizer
from mpq_core.compressed_model import save_compressed_model, unpack_in_program
from mpq_core.intake import LoadedModel, load_model
from mpq_core.onnx_export import OnnxRefused, save_onnx_model
from mpq_core.packing import pack_codes, unpack_codes
from mpq_core.pipeline import quantize_model
from mpq_core.quant_primitives import FLOAT_BITS
from mpq_core.quantized_weights import QuantizedLayer, apply_weights, quantize_weights
from mpq_core.runtime_exports import onnx_session
from mpq_core.scheme import QuantScheme
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.conftest import save_bytes, zoo_data
from tests.zoo import SmallCNN


class ConvNet(nn.Module):
    """Convolutions with BatchNorm (which ONNX exporters fold into the weights), a grouped
    convolution and a linear head whose input dimension takes group-wise scales."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def _model(fmt: str, dtype: torch.dtype = torch.float32) -> tuple[LoadedModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = ConvNet().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(-1.5, 1.5)
    net = net.to(dtype)
    x = torch.randn(5, 3, 4, 4).to(dtype)
    return load_model(save_bytes(net, (x[:2],), fmt)), [x]


def _quantized(
    model: LoadedModel, bits: dict[str, int], scheme: QuantScheme
) -> dict[str, QuantizedLayer]:
    layers = quantize_weights(model, bits, scheme=scheme)
    apply_weights(model, layers)
    return layers


def _reference(model: LoadedModel, inputs: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).float().numpy()


def _onnx_run(path: Path, inputs: list[torch.Tensor]) -> np.ndarray:
    session = onnx_session(path)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return np.asarray(session.run(None, feeds)[0], dtype=np.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_unpack_in_program_reads_what_pack_codes_writes(bits: int, signed: bool) -> None:
    g = np.random.default_rng(bits)
    q = 2 ** (bits - 1) - 1
    for count in (1, 7, 8, 9, 1001):
        codes = g.integers(-q, q + 1, count) if signed else g.integers(0, 2 * q + 2, count)
        packed = pack_codes(codes, bits, signed=signed)
        group = 1 if 8 % bits == 0 else bits
        padded = np.zeros(packed.size + (-packed.size % group), dtype=np.uint8)
        padded[: packed.size] = packed
        got = unpack_in_program(torch.from_numpy(padded), bits, count, signed=signed)
        assert got.tolist() == codes.tolist()
        assert got.tolist() == unpack_codes(packed, bits, count, signed=signed).tolist()


SCHEMES = {
    "channel": QuantScheme(),
    "group-asymmetric": QuantScheme(group_size=32, symmetric=False),
}
BITS = {"conv1.weight": 3, "conv2.weight": 2, "fc.weight": 5}


@pytest.mark.parametrize("scheme", SCHEMES, ids=list(SCHEMES))
@pytest.mark.parametrize("fmt", ["trace", "export"])
def test_compressed_program_equals_the_simulated_model(
    fmt: str, scheme: str, tmp_path: Path
) -> None:
    model, inputs = _model(fmt)
    layers = _quantized(model, {**BITS, "conv2.weight": FLOAT_BITS}, SCHEMES[scheme])
    path = save_compressed_model(model, layers, [inputs[0][:2]], tmp_path)
    program = torch.export.load(str(path))
    # Only packed codes are stored for the quantized layers, never their float weights.
    stored = {k.removeprefix("inner.") for k in program.state_dict}
    assert not stored & {"conv1.weight", "fc.weight"}
    assert program.state_dict["q2"].dtype == torch.uint8  # fc, 5 bits packed
    assert program.state_dict["q2"].numel() == -(-10 * 512 * 5 // 8 // 5) * 5
    with torch.no_grad():
        got = program.module()(*inputs).numpy()  # 5 samples: recorded with 2
    np.testing.assert_array_equal(got, _reference(model, inputs))


def test_compressed_program_runs_without_mpq(tmp_path: Path) -> None:
    model, inputs = _model("export")
    layers = _quantized(model, BITS, QuantScheme())
    path = save_compressed_model(model, layers, inputs, tmp_path)
    torch.save(inputs[0], tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        out = torch.export.load({str(path)!r}).module()(torch.load({str(tmp_path / "x.pt")!r}))
        assert not any(m.startswith("mpq") for m in sys.modules), "mpq was imported"
        torch.save(out.detach(), {str(tmp_path / "y.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    got = torch.load(tmp_path / "y.pt").numpy()
    np.testing.assert_array_equal(got, _reference(model, inputs))


def test_compressed_file_stores_the_packed_codes_not_the_weights(tmp_path: Path) -> None:
    model, inputs = _model("export")
    model.save(tmp_path / "float.pt2")
    layers = _quantized(model, dict.fromkeys(BITS, 2), QuantScheme())
    path = save_compressed_model(model, layers, inputs, tmp_path)
    packed = sum(-(-la.codes.numel() * 2 // 8) + 2 * la.scales.numel() for la in layers.values())
    others = sum(
        p.numel() * 4 for name, p in model.named_weights().items() if name not in layers
    ) + sum(b.numel() * b.element_size() for b in model.module.buffers())
    with zipfile.ZipFile(path) as zf:
        stored = sum(i.file_size for i in zf.infolist() if "/data/weights/weight_" in i.filename)
        # torch.export keeps the batch a program was recorded with; this file keeps no user data.
        assert all(i.file_size == 0 for i in zf.infolist() if "sample_inputs" in i.filename)
    # Codes padded to whole groups of eight fields (at most 7 bytes a layer); no float copy.
    assert packed + others <= stored <= packed + others + 7 * len(layers)
    # The decoding program costs a bounded number of bytes a layer beside the codes.
    float_weights = sum(la.codes.numel() * 4 for la in layers.values())
    overhead = path.stat().st_size - ((tmp_path / "float.pt2").stat().st_size - float_weights)
    assert overhead < packed + 16_000 * len(layers)


#: ONNX element type of each width's codes (symmetric, asymmetric).
CONTAINERS = {
    2: (onnx.TensorProto.INT2, onnx.TensorProto.UINT2),
    3: (onnx.TensorProto.INT4, onnx.TensorProto.UINT4),
    5: (onnx.TensorProto.INT8, onnx.TensorProto.UINT8),
}


@pytest.mark.parametrize("scheme", SCHEMES, ids=list(SCHEMES))
@pytest.mark.parametrize("fmt", ["trace", "export"])
def test_onnx_model_matches_the_simulated_model_with_integer_weights(
    fmt: str, scheme: str, tmp_path: Path
) -> None:
    model, inputs = _model(fmt)
    layers = _quantized(model, BITS, SCHEMES[scheme])
    done = save_onnx_model(model, layers, [inputs[0][:2]], tmp_path)
    # The BatchNorm folded into conv1 does not keep it in float: its factors join the scales.
    assert done.quantized == sorted(BITS) and not done.left_in_float
    assert done.opset == 25
    graph = onnx.load(str(done.path)).graph
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) < 64 * 27  # no float weight left
    signed = scheme == "channel"
    codes = sorted(i.data_type for i in graph.initializer if i.name.endswith("__codes"))
    assert codes == sorted(CONTAINERS[b][0 if signed else 1] for b in BITS.values())
    assert done.containers == {
        "conv1.weight": "int4" if signed else "uint4",
        "conv2.weight": "int2" if signed else "uint2",
        "fc.weight": "int8" if signed else "uint8",
    }
    ref = _reference(model, inputs)
    got = _onnx_run(done.path, inputs)  # 5 samples: exported with 2
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_onnx_model_of_a_bfloat16_model_casts_after_dequantizing(tmp_path: Path) -> None:
    model, inputs = _model("export", torch.bfloat16)
    layers = _quantized(model, BITS, QuantScheme())
    done = save_onnx_model(model, layers, [inputs[0][:2]], tmp_path)
    assert done.quantized == sorted(BITS)
    graph = onnx.load(str(done.path)).graph
    ops = [n.op_type for n in graph.node if n.name.startswith("fc.weight")]
    assert ops[:2] == ["DequantizeLinear", "Cast"]


def test_onnx_model_keeps_16_bit_layers_as_float16(tmp_path: Path) -> None:
    model, inputs = _model("trace")
    layers = _quantized(model, {**BITS, "fc.weight": FLOAT_BITS}, QuantScheme())
    done = save_onnx_model(model, layers, [inputs[0]], tmp_path)
    kinds = {i.name: i.data_type for i in onnx.load(str(done.path)).graph.initializer}
    assert kinds["fc.weight__half"] == onnx.TensorProto.FLOAT16
    ref = _reference(model, inputs)
    np.testing.assert_allclose(_onnx_run(done.path, inputs), ref, rtol=1e-5, atol=1e-6)


def test_small_cnn_with_a_grouped_convolution_exports(tmp_path: Path) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    model = load_model(save_bytes(SmallCNN().eval(), (x[:2],), "trace"))
    bits = {
        name: 4 for name in model.named_weights() if name.endswith("weight") and "bn" not in name
    }
    layers = _quantized(model, bits, QuantScheme())
    done = save_onnx_model(model, layers, [x[:2]], tmp_path)
    assert done.quantized == sorted(bits)
    ref = _reference(model, [x])
    np.testing.assert_allclose(_onnx_run(done.path, [x]), ref, rtol=1e-5, atol=1e-6)


def test_a_model_over_the_protobuf_limit_gets_no_onnx_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, inputs = _model("export")
    layers = _quantized(model, BITS, QuantScheme())
    # The model's 102 KB of weights stand in for a model over 2 GB.
    monkeypatch.setattr(onnx_export, "_PROTO_LIMIT", 100_000)
    with pytest.raises(OnnxRefused, match="over ONNX's 2 GB limit"):
        save_onnx_model(model, layers, [inputs[0][:2]], tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_job_without_runtime_exports_writes_neither(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    spec = JobSpec(budgets=["avg-bits=4"], runtime_exports=False, finetune=FinetuneSpec(epochs=0))
    result = quantize_model(zoo_bytes("mlp", "trace"), zoo_data("mlp", 40), spec, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.pt" in names and not names & {"model.onnx", "model.compressed.pt2"}
    assert "exports" not in result.report


@pytest.mark.parametrize("fmt", ["trace", "export"])
def test_onnx_quantizes_activations_as_the_simulated_model(
    fmt: str, tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    spec = JobSpec(
        budgets=["avg-bits=4"], quantize_activations=True, finetune=FinetuneSpec(epochs=0)
    )
    data = zoo_data("cnn", 40)
    result = quantize(spec, load_model(zoo_bytes("cnn", fmt)), data)
    write_artifacts(result, tmp_path)
    entry = result.report["exports"]["model.onnx"]
    assert entry["quantized_activations"] == len(result.encodings) == 4
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    pairs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(pairs) == 4
    inits = {i.name: i for i in graph.initializer}
    assert {inits[n.input[2]].data_type for n in pairs} == {onnx.TensorProto.UINT8}

    x = [t[:8] for t in data.inputs]
    with torch.no_grad(), ActivationQuantizer(result.model.named_weights(), result.encodings):
        want = result.model(*x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(tmp_path / "model.onnx"), options)
    got = as_written.run(None, {"input_0": x[0].numpy()})[0]
    # As written, the graph computes what the simulated model computes (float rounding only).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # onnxruntime's default optimizations pick integer kernels that requantize on their own.
    fused = _onnx_run(tmp_path / "model.onnx", x)
    assert np.abs(fused - want).max() < 1e-2 * np.abs(want).max()
