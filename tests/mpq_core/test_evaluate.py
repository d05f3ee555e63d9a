"""evaluate / model_outputs: metrics against labels and against the float model's outputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_core.data import CalibrationData
from mpq_core.evaluate import Metrics, evaluate, model_outputs
from mpq_core.intake import LoadedModel, load_model
from tests.conftest import save_bytes, zoo_data, zoo_inputs, zoo_module
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
