"""quantize_model end to end: artefacts, report, stock-loadable export, packed checkpoint."""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mpq_core.actquant import ActEncoding, ActivationQuantizer
from mpq_core.allocation import Allocation
from mpq_core.artifacts import _param_encoding
from mpq_core.data import CalibrationData
from mpq_core.errors import DataMismatch, ModelFormatError, MpqError, SpecError
from mpq_core.evaluate import evaluate, model_outputs
from mpq_core.intake import load_model
from mpq_core.packed_checkpoint import load_packed_checkpoint, restore_into
from mpq_core.packing import packed_nbytes
from mpq_core.pipeline import STAGES, PipelineResult, quantize_model
from mpq_core.pipeline import run as quantize
from mpq_core.quant_primitives import FLOAT_BITS, qmax
from mpq_core.quantized_weights import quantize_weights
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.conftest import save_bytes, stock_load, zoo_data, zoo_inputs, zoo_module
from tests.zoo import TinyTextEncoder

CASES = [("cnn", "script"), ("text", "script"), ("text", "export")]
BUDGETS = {"cnn": ["avg-bits=3.5"], "text": ["avg-bits=4"]}
EMBEDDINGS = {"emb.weight"}


def _spec(name: str, finetune_epochs: int = 2, **overrides: Any) -> JobSpec:
    finetune = FinetuneSpec(epochs=finetune_epochs, batch_size=8, lr=1e-3)
    kwargs: dict[str, Any] = {"budgets": BUDGETS[name], "batch_size": 16, **overrides}
    return JobSpec(finetune=finetune, **kwargs)


@dataclass
class Job:
    name: str
    fmt: str
    model_bytes: bytes
    data: CalibrationData
    test: CalibrationData
    result: PipelineResult
    events: list[tuple[str, float]]

    @property
    def out(self) -> Path:
        return self.result.out_dir

    @property
    def model_file(self) -> Path:
        return self.out / ("model.pt2" if self.fmt == "export" else "model.pt")


def _run(
    model_bytes: bytes, name: str, fmt: str, out: Path, **overrides: Any
) -> tuple[PipelineResult, list[tuple[str, float]], CalibrationData, CalibrationData]:
    data, test = zoo_data(name, 48), zoo_data(name, 16, seed=7)
    events: list[tuple[str, float]] = []
    result = quantize_model(
        model_bytes,
        data,
        _spec(name, **overrides),
        out,
        eval_source=test,
        progress=lambda stage, f, _m: events.append((stage, f)),
    )
    return result, events, data, test


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{f}" for n, f in CASES])
def job(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    zoo_bytes: Callable[[str, str], bytes],
) -> Job:
    name, fmt = request.param
    model_bytes = zoo_bytes(name, fmt)
    out = tmp_path_factory.mktemp(f"job-{name}-{fmt}")
    result, events, data, test = _run(model_bytes, name, fmt, out)
    return Job(name, fmt, model_bytes, data, test, result, events)


def _stock_outputs(module: torch.nn.Module, data: CalibrationData) -> torch.Tensor:
    with torch.no_grad():
        return module(*data.inputs).float()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


# --- artefacts and report --------------------------------------------------------------------


#: The runtime exports each case gets. The scripted text model has none: torch's TorchScript
#: converter stops at the ``prim::If`` of scripted ``nn.MultiheadAttention``, and the
#: TorchScript ONNX exporter has no ``aten::is_autocast_enabled`` (report.json says both).
RUNTIME_EXPORTS = {
    ("cnn", "script"): {"model.compressed.pt2", "model.onnx"},
    ("text", "script"): set(),
    ("text", "export"): {"model.compressed.pt2", "model.onnx"},
}


def test_all_artefacts_written(job: Job) -> None:
    files = {p.name for p in job.out.iterdir()}
    exports = job.result.report["exports"]
    for name in ("model.compressed.pt2", "model.onnx"):
        assert exports[name]["written"] == (name in RUNTIME_EXPORTS[job.name, job.fmt])
        assert exports[name]["written"] or exports[name]["reason"]
    want = {
        *RUNTIME_EXPORTS[job.name, job.fmt],
        job.model_file.name,
        "model.mpq.safetensors",
        "allocation.json",
        "sensitivity.json",
        "report.json",
        *(f"{plot}.{fmt}" for plot in ("bits", "sensitivity") for fmt in ("svg", "png")),
    }
    assert files == want
    assert job.result.report["artifacts"] == sorted(want)
    assert {n: p.name for n, p in job.result.artifacts.items()} == {n: n for n in want}


def test_report_contents(job: Job) -> None:
    report = json.loads((job.out / "report.json").read_text())
    assert report == json.loads(json.dumps(job.result.report, default=float))
    assert report["schema_version"] == 1 and report["kind"] == "mpq.report"
    assert report["model"]["format"] == ("export" if job.fmt == "export" else "torchscript")
    assert report["data"]["calibration_samples"] == 48
    assert report["data"]["eval_samples"] == 16
    assert report["data"]["labels"] is True
    budgets = report["budgets"]
    assert [b["budget"]["kind"] for b in budgets] == ["avg-bits"]
    for b in budgets:
        assert b["achieved"] <= b["asked"] + 1e-9
    # The avg-bits achieved is the parameter-weighted mean of the allocation.
    table = SensitivityTable.load(job.out / "sensitivity.json")
    params = {layer.name: layer.params for layer in table.layers}
    alloc = report["allocation"]
    assert list(alloc) == table.names
    mean = sum(params[n] * b for n, b in alloc.items()) / sum(params.values())
    assert budgets[0]["achieved"] == pytest.approx(mean)
    assert Allocation.load(job.out / "allocation.json").bits_by_layer() == alloc
    assert set(report["timings"]) == set(STAGES)
    assert all(t >= 0 for t in report["timings"].values())
    metrics = report["metrics"]
    for key in ("float", "quantized", "finetuned"):
        assert set(metrics[key]) == {
            "loss",
            "accuracy",
            "perplexity",
            "cosine",
            "sqnr_db",
            "samples",
        }
        assert metrics[key]["samples"] == 16
    assert metrics["float"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert (
        metrics["float"]["sqnr_db"] is None
    )  # identical outputs: infinite SQNR, null in strict JSON
    assert metrics["quantized"]["sqnr_db"] < math.inf
    assert report["finetune"]["epochs_run"] >= 1
    ft = report["finetune"]
    assert ft["val_loss_after"] <= ft["val_loss_before"]
    assert report["spec"] == job.result.report["spec"] == _spec(job.name).to_dict()


def test_progress_reports_every_stage_in_order(job: Job) -> None:
    seen: list[str] = []
    for stage, _ in job.events:
        if not seen or seen[-1] != stage:
            seen.append(stage)
    assert seen == list(STAGES)  # every stage, once, in order (no interleaving)
    for stage in STAGES:
        fractions = [f for s, f in job.events if s == stage]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0
        assert fractions == sorted(fractions)
        assert fractions.count(1.0) == 1


# --- the exported model and the packed checkpoint --------------------------------------------


def test_exported_model_reproduces_final_metrics(job: Job) -> None:
    quantized = stock_load(job.model_file, job.fmt)
    original = _stock_load_bytes(job.model_bytes, job.fmt)
    out = _stock_outputs(quantized, job.test)
    ref = _stock_outputs(original, job.test)
    final = job.result.report["metrics"]["finetuned"]
    labels = job.test.labels
    assert labels is not None
    assert final["accuracy"] == pytest.approx(float((out.argmax(-1) == labels).double().mean()))
    loss = float(F.cross_entropy(out.double(), labels))
    assert final["loss"] == pytest.approx(loss, rel=1e-5)
    cos = float(F.cosine_similarity(out.double(), ref.double(), dim=1).mean())
    assert final["cosine"] == pytest.approx(cos, rel=1e-6)
    noise = float(((out.double() - ref.double()) ** 2).sum())
    sqnr = 10 * math.log10(float((ref.double() ** 2).sum()) / noise)
    assert final["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
    float_metrics = job.result.report["metrics"]["float"]
    assert float_metrics["loss"] == pytest.approx(
        float(F.cross_entropy(ref.double(), labels)), rel=1e-5
    )


def _stock_load_bytes(data: bytes, fmt: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "export":
            return torch.export.load(io.BytesIO(data)).module()
        return torch.jit.load(io.BytesIO(data))


def test_packed_checkpoint_restores_bit_exactly(job: Job) -> None:
    ck = load_packed_checkpoint(job.out)
    alloc = job.result.report["allocation"]
    assert {n: layer.bits for n, layer in ck.layers.items()} == alloc
    assert ck.metadata["model_sha256"] == job.result.report["model"]["sha256"]
    for layer in ck.layers.values():
        assert int(layer.codes.abs().max()) <= qmax(layer.bits)
    fresh = load_model(job.model_bytes)
    before = {n: p.detach().clone() for n, p in fresh.named_weights().items()}
    restore_into(fresh, ck)
    exported = _weights(stock_load(job.model_file, job.fmt))
    restored = {n: p.detach() for n, p in fresh.named_weights().items()}
    assert set(restored) <= set(exported)
    for name, p in restored.items():
        assert torch.equal(p, exported[name]), f"{name} differs from the exported model"
        if name in ck.layers:
            assert torch.equal(p, ck.layers[name].dequantized())
            assert not torch.equal(p, before[name])  # really quantized
    # And it computes what the exported model computes.
    want = _stock_outputs(stock_load(job.model_file, job.fmt), job.test)
    got = model_outputs(fresh, job.test)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_packed_size_matches_prediction_plus_header(job: Job) -> None:
    path = job.out / "model.mpq.safetensors"
    raw = path.read_bytes()
    sizes = job.result.report["sizes"]
    assert sizes["packed_checkpoint_bytes"] == len(raw)
    (header,) = struct.unpack("<Q", raw[:8])
    payload = len(raw) - 8 - header
    predicted = sizes["predicted_bytes"]
    ck = load_packed_checkpoint(path)
    # Codes are padded to whole bytes per layer: under one byte each.
    exact = sum(
        packed_nbytes(layer.codes.numel(), layer.bits) + 2 * layer.scales.numel()
        for layer in ck.layers.values()
    ) + 4 * sum(t.numel() for t in ck.float_params.values())
    assert payload == exact
    assert 0 <= payload - predicted < len(ck.layers)
    overhead = len(raw) - predicted
    print(
        f"{job.name}-{job.fmt}: packed {len(raw)} B, predicted {predicted:.0f} B, "
        f"overhead {overhead:.0f} B (header {header} B)"
    )
    assert overhead < 4096  # a small model's header: about 1 KB
    assert sizes["float32_bytes"] > predicted


# --- sensitivity reuse -----------------------------------------------------------------------


def test_reusing_the_sensitivity_table(job: Job, tmp_path: Path) -> None:
    table = SensitivityTable.load(job.out / "sensitivity.json")
    again = quantize_model(
        job.model_bytes,
        job.data,
        _spec(job.name),
        tmp_path,
        eval_source=job.test,
        sensitivity=table,
    )
    assert again.report["allocation"] == job.result.report["allocation"]
    assert again.sensitivity.omega == table.omega
    first, second = job.result.report["timings"]["analyze"], again.report["timings"]["analyze"]
    print(f"{job.name}-{job.fmt}: analyze {first:.4f}s computed, {second:.4f}s reused")
    assert second < first / 4


def test_table_of_another_model_is_refused(
    zoo_bytes: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    cnn = zoo_bytes("cnn", "script")
    cnn_out = tmp_path / "cnn"
    quantize_model(cnn, zoo_data("cnn", 24), _spec("cnn", finetune_epochs=0), cnn_out)
    cnn_table = SensitivityTable.load(cnn_out / "sensitivity.json")
    text = zoo_bytes("text", "script")
    for i, table in enumerate([cnn_table, _text_table_of_other_weights(tmp_path)]):
        out = tmp_path / f"refused{i}"
        with pytest.raises(SpecError) as info:
            quantize_model(text, zoo_data("text", 24), _spec("text"), out, sensitivity=table)
        assert "another model" in info.value.message
        assert list(out.iterdir()) == []


def _text_table_of_other_weights(tmp_path: Path) -> SensitivityTable:
    """Same architecture and layer names, other weights: still another model."""
    torch.manual_seed(5)
    other = save_bytes(TinyTextEncoder().eval(), tuple(zoo_inputs("text", 2, seed=0)), "script")
    out = tmp_path / "other"
    quantize_model(other, zoo_data("text", 24), _spec("text", finetune_epochs=0), out)
    return SensitivityTable.load(out / "sensitivity.json")


def test_table_without_the_spec_bits_is_refused(job: Job, tmp_path: Path) -> None:
    table = SensitivityTable.load(job.out / "sensitivity.json")
    keep = [i for i, b in enumerate(table.bits) if b != 3]
    table.bits = [table.bits[i] for i in keep]
    table.omega = [[row[i] for i in keep] for row in table.omega]
    with pytest.raises(SpecError, match="bits"):
        quantize_model(job.model_bytes, job.data, _spec(job.name), tmp_path, sensitivity=table)
    assert list(tmp_path.iterdir()) == []


# --- activation quantization -----------------------------------------------------------------


def test_param_encodings_follow_the_quantizer_scheme(
    zoo_bytes: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    _run(
        zoo_bytes("cnn", "script"),
        "cnn",
        "script",
        tmp_path,
        quantize_activations=True,
        granularity="32",
        symmetric=False,
        finetune_epochs=0,
    )
    doc = json.loads((tmp_path / "encodings.json").read_text())["param_encodings"]
    assert {e["symmetric"] for e in doc.values()} == {False}
    # Group-wise where a layer's input columns split into groups of 32, per channel elsewhere.
    layers = {
        la["name"]: la for la in json.loads((tmp_path / "allocation.json").read_text())["layers"]
    }
    for name, enc in doc.items():
        cols = math.prod(layers[name]["shape"][1:])
        want = cols // 32 if cols > 32 and cols % 32 == 0 else 1
        assert enc["groups_per_channel"] == want, name


def test_param_encoding_of_a_group_wise_layer_counts_its_groups() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 4)
    model = load_model(save_bytes(net, (torch.randn(2, 64),), "export"))
    group = QuantScheme(group_size=32, symmetric=False)
    layer = quantize_weights(model, {"weight": 3}, scheme=group)["weight"]
    assert _param_encoding(layer) == {
        "bits": 3,
        "symmetric": False,
        "per_channel": True,
        "groups_per_channel": 2,
    }
    plain = quantize_weights(model, {"weight": FLOAT_BITS})["weight"]
    assert _param_encoding(plain)["per_channel"] is False


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_activation_quantization_writes_reproducible_encodings(
    zoo_bytes: Callable[[str, str], bytes], tmp_path: Path, name: str, fmt: str
) -> None:
    model_bytes = zoo_bytes(name, fmt)
    result, _, _, test = _run(
        model_bytes, name, fmt, tmp_path, quantize_activations=True, act_bits=6, finetune_epochs=1
    )
    assert (tmp_path / "encodings.json").is_file()
    assert "encodings.json" in result.report["artifacts"]
    doc = json.loads((tmp_path / "encodings.json").read_text())
    assert doc["kind"] == "mpq.encodings" and doc["schema_version"] == 1
    alloc = result.report["allocation"]
    assert {n: e["bits"] for n, e in doc["param_encodings"].items()} == alloc
    acts = {
        n: ActEncoding(bits=e["bits"], scale=e["scale"], signed=e["signed"])
        for n, e in doc["activation_encodings"].items()
    }
    assert all(e.bits == 6 for e in acts.values())
    # The exported model under these encodings gives the report's final metrics.
    exported = load_model(tmp_path / ("model.pt2" if fmt == "export" else "model.pt"))
    reference = model_outputs(load_model(model_bytes), test)
    metrics = evaluate(
        exported, test, reference, act_quant=ActivationQuantizer(exported.named_weights(), acts)
    )
    final = result.report["metrics"]["finetuned"]
    assert metrics.accuracy == final["accuracy"]
    assert metrics.loss == pytest.approx(final["loss"], rel=1e-5)
    assert metrics.cosine == pytest.approx(final["cosine"], rel=1e-6)
    # Every quantized linear / conv layer has an activation encoding (not embeddings).
    # This includes the attention projections of the TorchScript TinyTextEncoder, which the
    # fused attention fast path would hide (see test_actquant.py).
    assert set(acts) == set(alloc) - EMBEDDINGS


# --- failures before any artefact ------------------------------------------------------------


def _pickled_cnn() -> bytes:
    from tests.conftest import zoo_module

    buf = io.BytesIO()
    torch.save(zoo_module("cnn"), buf)
    return buf.getvalue()


def _float_ids(n: int) -> CalibrationData:
    ids, mask = zoo_inputs("text", n)
    return CalibrationData([ids.float(), mask], None)


def _bad_labels(n: int) -> CalibrationData:
    data = zoo_data("cnn", n)
    assert data.labels is not None
    return CalibrationData(data.inputs, data.labels + 10)


@pytest.mark.parametrize(
    ("model", "data", "error", "code"),
    [
        ("pickle", "cnn", ModelFormatError, "model_pickle"),
        ("cnn-script", "text", DataMismatch, "data_input_count"),
        ("text-export", "cnn", DataMismatch, "data_input_count"),
        ("text-export", "float-ids", DataMismatch, "data_dtype"),
        ("cnn-script", "bad-labels", DataMismatch, "data_labels"),
    ],
)
def test_bad_inputs_fail_before_any_artefact(
    zoo_bytes: Callable[[str, str], bytes],
    tmp_path: Path,
    model: str,
    data: str,
    error: type[MpqError],
    code: str,
) -> None:
    model_bytes = _pickled_cnn() if model == "pickle" else zoo_bytes(*model.split("-"))
    calib = {
        "cnn": lambda: zoo_data("cnn", 16),
        "text": lambda: zoo_data("text", 16),
        "float-ids": lambda: _float_ids(16),
        "bad-labels": lambda: _bad_labels(16),
    }[data]()
    out = tmp_path / "out"
    events: list[str] = []
    with pytest.raises(error) as info:
        quantize_model(
            model_bytes,
            calib,
            _spec("cnn"),
            out,
            progress=lambda stage, _f, _m: events.append(stage),
        )
    assert info.value.code == code
    assert not out.exists() or list(out.iterdir()) == []
    assert set(events) == {"intake"}  # it stopped at intake


def test_a_static_batch_of_one_is_named_in_the_report_with_the_fix() -> None:
    module = zoo_module("mlp")
    one = save_bytes(module, tuple(zoo_inputs("mlp", 1, seed=0)), "export_fixed")
    spec = JobSpec(budgets=["avg-bits=4"], finetune=FinetuneSpec(epochs=0))
    result = quantize(spec, one, zoo_data("mlp", 6))
    assert load_model(one).fixed_batch == 1
    (note,) = result.report["notes"]
    assert "static batch of 1" in note and "6 samples run one at a time" in note
    assert "torch.export.Dim" in note
    dynamic = quantize(
        spec, save_bytes(module, tuple(zoo_inputs("mlp", 2)), "export"), zoo_data("mlp", 6)
    )
    assert dynamic.report["notes"] == []


def test_predicted_and_measured_loss_rise_share_a_unit_for_sequence_outputs() -> None:
    # A per-token LM output (N, T, C): Omega sums the loss over the T positions, the metric is
    # a mean per position, so the report divides the prediction by T before comparing.
    from mpq_core.report import metric_units

    spec = JobSpec(budgets=["avg-bits=4"])
    per_position, unit = metric_units(6.0, (3, 10), spec)
    assert per_position == 2.0 and unit == "per position (3 per sample)"
    assert metric_units(6.0, (10,), spec) == (6.0, "per sample")
    mse, unit = metric_units(6.0, (3, 1), spec)
    assert mse == 4.0 and "mean squared error" in unit


def test_report_states_the_prediction_in_the_metric_unit(job: Job) -> None:
    report = job.result.report  # these models score one class vector per sample
    assert report["loss_unit"] == "per sample"
    assert report["predicted_metric_loss_increase"] == report["predicted_loss_increase"]
    rise = report["measured_loss_increase"]["calibration"]
    assert report["measured_over_predicted"] == pytest.approx(
        rise / report["predicted_metric_loss_increase"]
    )


# --- scores measured batch by batch ---------------------------------------------------------


@pytest.mark.parametrize("finetune_epochs", [0, 1])
def test_scores_of_a_sequence_model_equal_whole_output_evaluation(finetune_epochs: int) -> None:
    """The quantize and evaluate stages recompute the float reference per batch (batches of 4
    here, 10 samples); their metrics equal those measured against the float model's whole
    outputs, with activation quantization on the quantized run only, and the job's model ends
    holding the quantized weights."""
    from tests.mpq_core.test_evaluate import _lm, _lm_data

    float_model = _lm()
    data, test = _lm_data(24, seed=1), _lm_data(10, seed=2)
    reference = model_outputs(float_model, test)
    spec = JobSpec(
        budgets=["avg-bits=4"],
        batch_size=4,
        quantize_activations=True,
        act_bits=6,
        finetune=FinetuneSpec(epochs=finetune_epochs, batch_size=8, lr=1e-2),
    )
    result = quantize(spec, _lm(), data, eval_data=test)
    assert result.report["loss_unit"] == "per position (12 per sample)"
    model, weights = result.model, result.model.named_weights()
    for name, layer in result.layers.items():
        assert torch.equal(weights[name], layer.dequantized()), name
    acts = ActivationQuantizer(weights, result.encodings)
    # The model as the job left it: quantized, or quantized and then fine-tuned.
    last = "finetuned" if finetune_epochs else "quantized"
    want = {
        "float": evaluate(float_model, test, reference),
        last: evaluate(model, test, reference, act_quant=acts),
    }
    for key, metrics in want.items():
        got = result.metrics[key]
        assert got is not None and got.to_dict() == pytest.approx(metrics.to_dict(), rel=1e-5), key
    assert (result.metrics["finetuned"] is None) == (finetune_epochs == 0)
