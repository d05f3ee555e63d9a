"""Real architectures (tests/zoo_hf.py: BERT, DistilBERT, RoBERTa, ALBERT, GPT-2, LLaMA, T5,
ViT, CLIP text and vision towers, Whisper's encoder and wav2vec2 from ``transformers``, random
weights, tiny configs), traced to TorchScript and exported with
torch.export, through the engine as a user runs them:

- profiling finds every weight-bearing layer of the eager module (the rest is listed with why);
- Fisher sensitivities agree with the one-backward-per-sample reference, including position
  tables shared by the whole batch (BERT, GPT-2, T5's relative attention bias), weights used by
  several layers (ALBERT) or twice (tied embeddings) and weights stored transposed (GPT-2);
- the whole job runs; the written model loads with stock torch and reproduces the quantized
  model; the packed checkpoint restores bit-exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mpq_core import (
    FinetuneSpec,
    JobResult,
    JobSpec,
    load_model,
    profile_model,
    quantize,
    write_artifacts,
)
from mpq_core.capture import LayerCapture, WeightRef, capture_context
from mpq_core.data import CalibrationData
from mpq_core.errors import DataMismatch
from mpq_core.intake import LoadedModel
from mpq_core.packed_checkpoint import load_packed_checkpoint, restore_into
from mpq_core.profiling import ModelProfile
from mpq_core.runner import check_data_fits
from mpq_core.runtime_exports import onnx_session
from mpq_core.sensitivity.fisher import fisher_sensitivity
from tests.conftest import save_bytes, stock_load
from tests.mpq_core.test_fisher import reference_omega
from tests.real_zoo import ZOO, ZooEntry, build

FORMATS = ("trace", "export")
BITS = [2, 4, 8]
N = 7
BATCH = 3

#: Matrices an eager model holds that no quantizable op uses, and why they stay in float.
LEFT_IN_FLOAT = {
    "model.vit.embeddings.cls_token": "added to the patches, not multiplied",
    "model.vit.embeddings.position_embeddings": "added to the patches, not multiplied",
    "model.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0": (
        "weight norm: the conv's weight is computed from g and v in every forward"
    ),
    "model.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1": (
        "weight norm: the conv's weight is computed from g and v in every forward"
    ),
}
#: Layers whose output the whole batch shares, per entry.
SHARED = {
    "bert": {"model.bert.embeddings.position_embeddings.weight"},
    "distilbert": {"model.distilbert.embeddings.position_embeddings.weight"},
    "albert": {"model.albert.embeddings.position_embeddings.weight"},
    "gpt2": {"model.transformer.wpe.weight"},
    "clip_text": {"model.text_model.embeddings.position_embedding.weight"},
    "clip_vision": {"model.vision_model.embeddings.position_embedding.weight"},
    "whisper_encoder": {"encoder.embed_positions.weight"},
    "t5": {
        "model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "model.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    },
}


@dataclass
class Case:
    name: str
    fmt: str
    entry: ZooEntry
    model_bytes: bytes
    model: LoadedModel
    data: CalibrationData
    profile: ModelProfile


_cases: dict[tuple[str, str, torch.dtype], Case] = {}


def _case(name: str, fmt: str, dtype: torch.dtype = torch.float32) -> Case:
    """Built, saved, loaded and profiled once per session (the tests below only read it)."""
    if (name, fmt, dtype) not in _cases:
        entry = build(name, dtype)
        model_bytes = save_bytes(entry.module, tuple(entry.inputs(2, 0)), fmt)
        model = load_model(model_bytes)
        g = torch.Generator().manual_seed(5)
        labels = torch.randint(0, entry.classes, (N,), generator=g) if entry.classes else None
        data = CalibrationData(entry.inputs(N, 1), labels)
        _cases[name, fmt, dtype] = Case(
            name, fmt, entry, model_bytes, model, data, profile_model(model, data)
        )
    return _cases[name, fmt, dtype]


def _expected_kind(module: torch.nn.Module) -> str:
    nn = torch.nn
    kinds: list[tuple[type[nn.Module], str]] = [
        (nn.Embedding, "embedding"),
        (nn.ConvTranspose2d, "conv_transpose2d"),
        (nn.Conv1d, "conv1d"),
        (nn.Conv2d, "conv2d"),
        (nn.Conv3d, "conv3d"),
        (nn.LSTM, "rnn"),
        (nn.GRU, "rnn"),
    ]
    for cls, kind in kinds:
        if isinstance(module, cls):
            return kind
    return "linear"  # nn.Linear, and transformers' Conv1D (a linear with its weight transposed)


CASES = [(name, fmt) for name in ZOO for fmt in FORMATS]
IDS = [f"{name}-{fmt}" for name, fmt in CASES]
#: Half-precision models: (name, format, dtype, how close Fisher and the reference must be).
#: Both round at the model's precision, in different orders (batched against one sample at a
#: time), so they agree to about the dtype's epsilon (bfloat16 7.8e-3, float16 9.8e-4).
HALF = [
    ("resnet", "trace", torch.bfloat16, 1e-2),
    ("gpt2", "export", torch.bfloat16, 1e-2),
    ("llama", "trace", torch.bfloat16, 1e-2),
    ("resnet", "export", torch.float16, 2e-3),
    ("gpt2", "trace", torch.float16, 2e-3),
    ("llama", "export", torch.float16, 2e-3),
]
HALF_IDS = [f"{n}-{f}-{str(d).removeprefix('torch.')}" for n, f, d, _ in HALF]


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=IDS)
def test_profile_finds_every_weight_bearing_layer(name: str, fmt: str) -> None:
    case = _case(name, fmt)
    eager = {n for n, p in case.entry.module.named_parameters() if p.dim() >= 2}
    found = {layer.name for layer in case.profile.layers}
    assert found <= eager, found - eager
    assert eager - found == {n for n in eager if n in LEFT_IN_FLOAT}, eager - found
    assert set(case.profile.left_in_float) == eager - found  # reported, with the reason
    for layer in case.profile.layers:
        owner = case.entry.module.get_submodule(layer.name.rpartition(".")[0])
        assert layer.kind == _expected_kind(owner), (layer.name, type(owner).__name__)
    shared = {
        layer.name for layer in case.profile.layers if "shared" in layer.extra.get("layouts", [])
    }
    assert shared == SHARED.get(name, set())


SHARED_CASES = [(name, fmt) for name, fmt in CASES if name in SHARED]


@pytest.mark.parametrize(("name", "fmt"), SHARED_CASES, ids=[f"{n}-{f}" for n, f in SHARED_CASES])
def test_shared_outputs_are_followed_to_the_batch_not_finite_differenced(
    name: str, fmt: str
) -> None:
    # A flow that cannot be followed falls back to finite differences, which would still pass
    # the reference comparison in float32: check the exact path is the one taken.
    case = _case(name, fmt)
    weights = case.model.named_weights()
    refs = [WeightRef(layer.name, weights[layer.name]) for layer in case.profile.layers]
    shared = {
        layer.name: {i for i, lay in enumerate(layer.extra["layouts"]) if lay == "shared"}
        for layer in case.profile.layers
    }
    cap = LayerCapture(refs, shared=shared, batch=BATCH)
    with capture_context(), cap:
        case.model(*[t[:BATCH] for t in case.data.inputs])
    cap.finish()
    flows = {rec.name: rec.flow for rec in cap.records if rec.flow is not None}
    assert set(flows) == SHARED[name]
    for layer_name, flow in flows.items():
        assert flow.failed is None, (layer_name, flow.failed)
        assert flow.consumers and all(step.node is not None for step in flow.consumers)


def test_gpt2_conv1d_weights_are_seen_as_stored_transposed() -> None:
    case = _case("gpt2", "trace")
    transposed = {layer.name for layer in case.profile.layers if layer.extra.get("transposed")}
    assert transposed == {
        f"model.transformer.h.{i}.{part}.weight"
        for i in range(2)
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    # c_proj is square: only the strides tell a stored-transposed weight from a transposed view.
    assert case.model.named_weights()["model.transformer.h.0.attn.c_proj.weight"].shape == (16, 16)


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=IDS)
def test_fisher_matches_the_per_sample_reference(name: str, fmt: str) -> None:
    _check_fisher(_case(name, fmt), exact=1e-3)


@pytest.mark.parametrize(("name", "fmt", "dtype", "tolerance"), HALF, ids=HALF_IDS)
def test_fisher_matches_the_reference_in_half_precision(
    name: str, fmt: str, dtype: torch.dtype, tolerance: float
) -> None:
    case = _case(name, fmt, dtype)
    assert {p.dtype for p in case.model.named_weights().values()} == {dtype}
    _check_fisher(case, exact=tolerance)


def _check_fisher(case: Case, exact: float) -> None:
    got = torch.tensor(
        fisher_sensitivity(case.model, case.data, case.profile, BITS, batch_size=BATCH),
        dtype=torch.float64,
    )
    want = reference_omega(case.model, case.data, case.profile, BITS, batch_size=BATCH)
    assert bool((want > 0).all()), "every layer and bit width is exercised"
    rel = (got - want).abs() / want
    worst = int(rel.max(dim=1).values.argmax())
    assert float(rel.max()) <= exact, (
        f"{case.profile.layers[worst].name}: {float(rel[worst].max()):.3g} relative\n"
        f"got {got[worst].tolist()}\nwant {want[worst].tolist()}"
    )


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=IDS)
def test_whole_job_exports_a_model_stock_torch_runs(name: str, fmt: str, tmp_path: Path) -> None:
    _check_whole_job(_case(name, fmt), tmp_path)


@pytest.mark.parametrize(("name", "fmt", "dtype", "tolerance"), HALF, ids=HALF_IDS)
def test_whole_job_in_half_precision(
    name: str, fmt: str, dtype: torch.dtype, tolerance: float, tmp_path: Path
) -> None:
    del tolerance
    result = _check_whole_job(_case(name, fmt, dtype), tmp_path)
    assert {p.dtype for p in result.model.named_weights().values()} == {dtype}
    # Sizes and ratios are against the model as uploaded: 2 bytes a parameter, not 4.
    sizes, params = result.report["sizes"], result.report["model"]["params"]
    assert sizes["model_bytes"] == 2 * params
    assert sizes["model_dtypes"] == [str(dtype).removeprefix("torch.")]
    assert result.sensitivity.model_bytes == 2 * params
    # The packed checkpoint keeps the float parameters at 2 bytes too, as the size budget counts.
    ck = load_packed_checkpoint(tmp_path / "model.mpq.safetensors")
    assert {t.dtype for t in ck.float_params.values()} == {dtype}
    raw = (tmp_path / "model.mpq.safetensors").read_bytes()
    payload = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    assert 0 <= payload - sizes["predicted_bytes"] < len(ck.layers)  # codes padded per layer


def _check_whole_job(case: Case, tmp_path: Path) -> JobResult:
    fmt = case.fmt
    spec = JobSpec(
        budgets=["avg-bits=4"], batch_size=BATCH, eval_fraction=0.0, finetune=FinetuneSpec(epochs=0)
    )
    result = quantize(spec, load_model(case.model_bytes), case.data)
    assert result.allocation.bits_by_layer().keys() == {layer.name for layer in case.profile.layers}
    files = write_artifacts(result, tmp_path)
    model_file = files["model.pt2" if fmt == "export" else "model.pt"]

    stock = stock_load(model_file, fmt)
    with torch.no_grad():
        want = result.model(*case.data.inputs)
        got = stock(*case.data.inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    _check_runtime_exports(case, result, files, want)

    restored = load_model(case.model_bytes)
    restore_into(restored, load_packed_checkpoint(files["model.mpq.safetensors"]))
    quantized = result.model.named_weights()
    for layer_name, tensor in restored.named_weights().items():
        assert torch.equal(tensor, quantized[layer_name]), layer_name
    return result


#: Zoo models whose ONNX file takes only the batch size it was recorded with: the TorchScript
#: ONNX exporter refuses sequence-first ``nn.MultiheadAttention``, and the model translated to a
#: torch.export program reshapes by a data-dependent size that a dynamic batch cannot follow.
ONNX_FIXED_BATCH = {("mha_seq_first", "trace")}


def _check_runtime_exports(
    case: Case, result: JobResult, files: dict[str, Path], want: torch.Tensor
) -> None:
    """The compressed program equals the simulated model bit for bit with stock torch; the ONNX
    model runs in onnxruntime within float rounding of it (or is refused, as listed)."""
    compressed = stock_load(files["model.compressed.pt2"], "export")
    with torch.no_grad():
        torch.testing.assert_close(compressed(*case.data.inputs), want, rtol=0, atol=0)
    exports = result.report["exports"]
    assert exports["model.compressed.pt2"]["max_abs_difference"] == 0.0
    if want.dtype != torch.float32:
        # onnxruntime's CPU kernels lack many 16-bit ops; the report says what happened.
        entry = exports["model.onnx"]
        assert entry["written"] == ("model.onnx" in files)
        assert entry.get("reason") or entry.get("max_abs_difference") is not None
        return
    fixed = (case.name, case.fmt) in ONNX_FIXED_BATCH
    assert exports["model.onnx"]["batch"] == (len(result.example_inputs[0]) if fixed else "dynamic")
    inputs = [t[: len(result.example_inputs[0])] for t in case.data.inputs] if fixed else None
    session = onnx_session(files["model.onnx"])
    feeds = {
        i.name: t.numpy()
        for i, t in zip(session.get_inputs(), inputs or case.data.inputs, strict=True)
    }
    got = torch.from_numpy(session.run(None, feeds)[0]).float()
    ref = want.float()[: len(got)]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert exports["model.onnx"]["quantized_layers"] > 0


def test_labels_per_sample_for_scores_per_frame_are_refused_before_any_work() -> None:
    # wav2vec2's CTC head scores every frame; one label per clip cannot be its target.
    case = _case("wav2vec2", "trace")
    data = CalibrationData(case.data.inputs, torch.zeros(N, dtype=torch.long))
    with pytest.raises(DataMismatch) as err:
        check_data_fits(case.model, data)
    assert err.value.code == "data_labels"
    assert "per position" in err.value.message and "leave 'labels' out" in err.value.message
