"""evaluate / model_outputs: metrics against labels and against the float model's outputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_core.actquant import ActivationQuantizer, calibrate_activations
from mpq_core.data import CalibrationData
from mpq_core.evaluate import Evaluator, Metrics, MetricSums, compare, evaluate, model_outputs
from mpq_core.intake import LoadedModel, load_model
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.weight_sets import copy_weights
from tests.conftest import save_bytes, zoo_data, zoo_inputs, zoo_module
from tests.mpq_core.live_tensors import LivePeak
from tests.zoo import torchscript_bytes


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # (N, 1): not class scores


class _Tagger(nn.Module):
    """Per-position class scores (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def _scripted(module: nn.Module, example: tuple[torch.Tensor, ...]) -> LoadedModel:
    torch.manual_seed(3)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    return load_model(torchscript_bytes(module.eval(), example))


@pytest.mark.parametrize(("name", "fmt"), [("cnn", "script"), ("text", "export")])
def test_float_model_against_itself(
    zoo_bytes: Callable[[str, str], bytes], name: str, fmt: str
) -> None:
    model = load_model(zoo_bytes(name, fmt))
    data = zoo_data(name, 30)
    assert data.labels is not None
    ref = model_outputs(model, data, batch_size=7)
    assert ref.shape[0] == 30
    m = evaluate(model, data, ref, batch_size=7)
    assert isinstance(m, Metrics)
    assert m.samples == 30
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert m.sqnr_db == math.inf
    hits = sum(int(ref[i].argmax()) == int(data.labels[i]) for i in range(30))
    assert m.accuracy == hits / 30
    ce = F.cross_entropy(ref.double(), data.labels)
    assert m.loss == pytest.approx(float(ce), rel=1e-6)
    # Perplexity is reported for sequence outputs (N, T, C) only; these score whole samples.
    assert m.perplexity is None
    assert set(m.to_dict()) == {"loss", "accuracy", "perplexity", "cosine", "sqnr_db", "samples"}


def test_batch_size_does_not_change_the_metrics(zoo_bytes: Callable[[str, str], bytes]) -> None:
    model = load_model(zoo_bytes("text", "script"))
    data = zoo_data("text", 23)
    ref = model_outputs(model, data, batch_size=64)
    noisy = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    a = evaluate(model, data, noisy, batch_size=64)
    b = evaluate(model, data, noisy, batch_size=4)
    assert a.accuracy == b.accuracy
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert a.cosine == pytest.approx(b.cosine, rel=1e-6)
    assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-5)


def test_cosine_and_sqnr_against_a_perturbed_reference(
    zoo_bytes: Callable[[str, str], bytes],
) -> None:
    model = load_model(zoo_bytes("mlp", "script"))
    data = zoo_data("mlp", 20)
    out = model_outputs(model, data).double()
    ref = out + 0.1 * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double()
    m = evaluate(model, data, ref.float())
    ref32 = ref.float().double()
    want_sqnr = 10 * math.log10(float((ref32**2).sum()) / float(((out - ref32) ** 2).sum()))
    assert m.sqnr_db == pytest.approx(want_sqnr, rel=1e-6)
    want_cos = float(F.cosine_similarity(out, ref32, dim=1).mean())
    assert m.cosine == pytest.approx(want_cos, rel=1e-6)
    assert m.cosine < 1.0
    # With labels the loss stays the cross entropy against the labels, whatever the reference.
    assert data.labels is not None
    assert m.loss == pytest.approx(float(F.cross_entropy(out, data.labels)), rel=1e-6)


def test_without_labels_loss_is_kl_to_reference(zoo_bytes: Callable[[str, str], bytes]) -> None:
    model = load_model(zoo_bytes("cnn", "script"))
    data = zoo_data("cnn", 16, labels=False)
    out = model_outputs(model, data)
    same = evaluate(model, data, out)
    assert same.loss == pytest.approx(0.0, abs=1e-12)
    assert same.accuracy is None and same.perplexity is None
    ref = out + 0.5 * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    m = evaluate(model, data, ref)
    want = F.kl_div(
        F.log_softmax(out.double(), -1),
        F.log_softmax(ref.double(), -1),
        log_target=True,
        reduction="batchmean",
    )
    assert m.loss == pytest.approx(float(want), rel=1e-6)
    assert m.loss > 0


def test_regression_output_uses_mse() -> None:
    model = _scripted(_Regressor(), (torch.randn(2, 16),))
    x = torch.randn(25, 16, generator=torch.Generator().manual_seed(4))
    data = CalibrationData([x])
    out = model_outputs(model, data)
    assert out.shape == (25, 1)
    same = evaluate(model, data, out)
    assert same.loss == 0.0
    assert same.accuracy is None and same.perplexity is None
    ref = out + 0.2 * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    m = evaluate(model, data, ref)
    assert m.loss == pytest.approx(float(F.mse_loss(out.double(), ref.double())), rel=1e-6)
    assert m.accuracy is None and m.perplexity is None


def test_sequence_outputs_score_every_position() -> None:
    model = _scripted(_Tagger(), (torch.zeros(2, 5, dtype=torch.long),))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 12, (10, 5), generator=g)
    labels = torch.randint(0, 3, (10, 5), generator=g)
    data = CalibrationData([ids], labels)
    out = model_outputs(model, data, batch_size=3)
    assert out.shape == (10, 5, 3)
    m = evaluate(model, data, out, batch_size=3)
    hits = sum(int(out[i, t].argmax()) == int(labels[i, t]) for i in range(10) for t in range(5))
    assert m.accuracy == pytest.approx(hits / 50)
    ce = F.cross_entropy(out.double().reshape(-1, 3), labels.reshape(-1))
    assert m.loss == pytest.approx(float(ce), rel=1e-6)
    assert m.perplexity == pytest.approx(math.exp(m.loss), rel=1e-12)


def test_fixed_batch_export_drops_padding(zoo_bytes: Callable[[str, str], bytes]) -> None:
    """A fixed-batch program runs padded batches; only the real samples are scored."""
    fixed = load_model(zoo_bytes("mlp", "export_fixed"))
    dynamic = load_model(
        save_bytes(zoo_module("mlp"), tuple(zoo_inputs("mlp", 2, seed=0)), "script")
    )
    data = zoo_data("mlp", 10)  # not a multiple of the fixed batch (4)
    a = model_outputs(fixed, data)
    b = model_outputs(dynamic, data)
    assert a.shape == (10, 5)
    assert torch.allclose(a, b, atol=1e-6)
    m = evaluate(fixed, data, b)
    assert m.samples == 10
    assert m.cosine == pytest.approx(1.0, abs=1e-6)


# --- streaming: compare() recomputes the float reference batch by batch ----------------------


class _TinyLM(nn.Module):
    """Next-token scores (N, T, V) over a vocabulary much wider than the model: its outputs,
    not its activations, dominate memory, as with a language model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 300)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids))))


LM_BITS = {"emb.weight": 4, "fc.weight": 3, "out.weight": 2}


def _lm_data(n: int, labels: bool = True, seed: int = 7) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 12), generator=g)
    return CalibrationData([ids], torch.randint(0, 300, (n, 12), generator=g) if labels else None)


def _quantized(model: LoadedModel, bits: dict[str, int]) -> dict[str, torch.Tensor]:
    """Quantize ``model`` in place; the float values of the quantized layers."""
    floats = copy_weights(model, bits)
    apply_weights(model, quantize_weights(model, bits))
    return floats


def _whole_tensor_metrics(
    out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None
) -> dict[str, float | None]:
    """The metrics as evaluate computed them before streaming: on every output at once,
    in float64."""
    out, ref = out.double(), ref.double()
    classes = out.dim() in (2, 3) and out.shape[-1] >= 2
    accuracy = None
    if labels is not None and classes:
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
        accuracy = float((out.argmax(-1) == labels).double().mean())
    elif classes:
        logp, logq = F.log_softmax(ref, -1), F.log_softmax(out, -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
    else:
        loss = F.mse_loss(out, ref)
    flat, ref_flat = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    noise = float(((flat - ref_flat) ** 2).sum())
    return {
        "loss": float(loss),
        "accuracy": accuracy,
        "cosine": float(F.cosine_similarity(flat, ref_flat, dim=1).mean()),
        "sqnr_db": 10 * math.log10(float((ref_flat**2).sum()) / noise),
    }


def _lm() -> LoadedModel:
    return _scripted(_TinyLM(), (torch.zeros(2, 12, dtype=torch.long),))


@pytest.mark.parametrize("kind", ["lm-labels", "lm-kl", "regressor"])
def test_streamed_metrics_equal_whole_tensor_metrics(kind: str) -> None:
    if kind == "regressor":
        model = _scripted(_Regressor(), (torch.randn(2, 16),))
        data = CalibrationData([torch.randn(37, 16, generator=torch.Generator().manual_seed(8))])
        bits = {"fc1.weight": 2, "fc2.weight": 2}
    else:
        model, data, bits = _lm(), _lm_data(37, labels=kind == "lm-labels"), LM_BITS
    ref = model_outputs(model, data)
    float_weights = _quantized(model, bits)
    out = model_outputs(model, data)
    got = compare(model, data, float_weights, batch_size=5)  # 37 = 7 batches of 5 and one of 2
    want = _whole_tensor_metrics(out, ref, data.labels)
    q = got.quantized_metrics
    assert q.samples == got.float_metrics.samples == 37
    assert q.loss == pytest.approx(want["loss"], rel=1e-5)
    assert q.accuracy == pytest.approx(want["accuracy"], abs=1e-12)
    assert q.cosine == pytest.approx(want["cosine"], rel=1e-6)
    assert q.sqnr_db == pytest.approx(want["sqnr_db"], rel=1e-5)
    assert got.output_shape == tuple(ref.shape[1:])
    # The float model against itself: what the old path gave for the reference.
    f = got.float_metrics
    assert (f.cosine, f.sqnr_db) == (1.0, math.inf)
    if data.labels is not None:
        want_float = float(F.cross_entropy(ref.double().reshape(-1, 300), data.labels.reshape(-1)))
        assert f.loss == pytest.approx(want_float, rel=1e-5)
    else:
        assert f.loss == 0.0


def test_compare_leaves_the_model_holding_the_quantized_weights() -> None:
    model, data = _lm(), _lm_data(9)
    params = model.named_weights()
    float_weights = _quantized(model, LM_BITS)
    quantized = copy_weights(model)
    storage = {n: p.data_ptr() for n, p in params.items()}
    compare(model, data, float_weights, batch_size=4)
    after = model.named_weights()
    assert all(torch.equal(after[n], quantized[n]) for n in quantized)
    assert {n: p.data_ptr() for n, p in after.items()} == storage  # copied in place
    # Given explicitly, the quantized set is what the model holds afterwards, too.
    compare(model, data, float_weights, {n: quantized[n] for n in LM_BITS}, batch_size=4)
    assert all(torch.equal(model.named_weights()[n], quantized[n]) for n in quantized)


def test_compare_with_activation_quantization_matches_evaluate() -> None:
    """The quantized run is under act_quant, the float reference never is."""
    model, data = _lm(), _lm_data(21)
    ref = model_outputs(model, data)
    float_weights = _quantized(model, LM_BITS)
    encodings = calibrate_activations(model, data, ["fc.weight", "out.weight"], 3, batch_size=8)
    aq = ActivationQuantizer(model.named_weights(), encodings)
    plain = Evaluator(batch_size=8).compare(model, data, float_weights)
    got = Evaluator(batch_size=8, act_quant=aq).compare(model, data, float_weights)
    want = evaluate(model, data, ref, batch_size=8, act_quant=aq)
    assert got.quantized_metrics.to_dict() == pytest.approx(want.to_dict(), rel=1e-6)
    assert got.quantized_metrics.sqnr_db < plain.quantized_metrics.sqnr_db  # 3-bit inputs
    assert got.float_metrics == plain.float_metrics  # the reference is not act-quantized


def _peak_bytes(samples: int, batch_size: int) -> tuple[int, list[int]]:
    """The peak of live tensor bytes in compare(), and the bytes alive as each forward pass
    starts (at its embedding lookup)."""
    model, data = _lm(), _lm_data(samples)
    float_weights = _quantized(model, LM_BITS)
    with LivePeak(mark=torch.ops.aten.embedding.default) as probe:
        compare(model, data, float_weights, batch_size=batch_size)
    return probe.peak, probe.at_mark


def test_compare_memory_is_bounded_by_a_batch_not_the_samples() -> None:
    one_batch_output = 8 * 12 * 300 * 4  # bytes of one batch's (8, 12, 300) float32 scores
    (small, _), (large, at_forward) = _peak_bytes(8, 8), _peak_bytes(128, 8)
    assert large == small, (small, large)
    # Two forward passes per batch: the reference's starts with nothing of an earlier batch
    # alive, the quantized model's with the reference's output only (beside compare's copy of
    # the quantized layers and the batch's ids).
    held = (40 * 8 + 8 * 8 + 300 * 8) * 4 + 4096
    assert len(at_forward) == 2 * 16
    assert max(at_forward[0::2]) < held, at_forward
    assert max(at_forward[1::2]) < held + one_batch_output, at_forward


@pytest.mark.parametrize("labels", [True, False])
def test_scoring_a_batch_in_chunks_of_samples_changes_nothing(labels: bool) -> None:
    g = torch.Generator().manual_seed(9)
    ref = torch.randn(7, 12, 300, generator=g)
    out = ref + 0.3 * torch.randn(7, 12, 300, generator=g)
    target = torch.randint(0, 300, (7, 12), generator=g) if labels else None
    whole, chunked = MetricSums(), MetricSums(chunk_elements=2 * 12 * 300)  # 2 samples at once
    whole.add(out, ref, target)
    chunked.add(out, ref, target)
    got, once = chunked.metrics().to_dict(), whole.metrics().to_dict()
    want = _whole_tensor_metrics(out, ref, target)
    assert got["accuracy"] == once["accuracy"] == want.pop("accuracy")
    assert got["samples"] == 7
    assert {k: got[k] for k in want} == pytest.approx({k: once[k] for k in want}, rel=1e-6)
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5)
