from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mpq_core.sensitivity.hawq as hawq_mod
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, load_model
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.quant_primitives import quantization_error
from mpq_core.sensitivity.hawq import hawq_sensitivity, hutchinson_traces
from tests.zoo import SmallCNN, export_bytes, torchscript_bytes


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny ops (log_softmax on 16x10) spend milliseconds in OpenMP barriers when the cores are
    # shared with other processes; one thread keeps these tests fast and their timing stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TinyTanh(nn.Module):
    """Smooth, so finite differences of gradients agree with double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _tiny() -> tuple[TinyTanh, CalibrationData]:
    """Briefly trained (a random network's cross-entropy Hessian is badly indefinite)."""
    torch.manual_seed(0)
    model = TinyTanh()
    x = torch.randn(48, 6)
    y = (x[:, :3] + 0.5 * torch.randn(48, 3)).argmax(dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), CalibrationData([x], y)


def _exact_traces(
    eager: nn.Module, data: CalibrationData, names: list[str], kind: str
) -> list[float]:
    x = data.inputs[0]
    labels = data.labels
    assert labels is not None
    params = {k: v.detach() for k, v in eager.named_parameters()}
    ref = eager(x).detach()
    traces = []
    for name in names:

        def loss_of(w: torch.Tensor, name: str = name) -> torch.Tensor:
            out = functional_call(eager, {**params, name: w}, (x,))
            if kind == "ce":
                return F.cross_entropy(out, labels)
            return 0.5 * ((out - ref) ** 2).sum(dim=1).mean()

        w = params[name]
        h = torch.autograd.functional.hessian(loss_of, w)
        traces.append(float(h.reshape(w.numel(), w.numel()).trace()))
    return traces


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_hutchinson_matches_exact_trace(kind: str) -> None:
    eager, data = _tiny()
    model = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    profile = profile_model(model, data)
    names = [layer.name for layer in profile.layers]
    assert names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    exact = _exact_traces(eager, data, names, kind)
    est = hutchinson_traces(model, data, profile, iterations=400, batch_size=8, loss=kind)
    assert est.hessian == "double_backward"
    assert est.iterations == 400
    for got, want in zip(est.traces, exact, strict=True):
        assert want > 0
        assert got == pytest.approx(want, rel=0.1)


def test_finite_difference_agrees_with_double_backward() -> None:
    eager, data = _tiny()
    model = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    profile = profile_model(model, data)
    db = hutchinson_traces(model, data, profile, iterations=10, seed=3)
    fd = hutchinson_traces(model, data, profile, iterations=10, seed=3, hessian="finite_difference")
    assert fd.hessian == "finite_difference"
    # The same Rademacher probes: only the H v products differ, by finite-difference error.
    assert fd.traces == pytest.approx(db.traces, rel=2e-2, abs=1e-4)


def test_falls_back_to_finite_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    eager, data = _tiny()
    model = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    profile = profile_model(model, data)
    before = {k: v.detach().clone() for k, v in model.named_weights().items()}

    def broken(*args: object) -> list[torch.Tensor]:
        raise RuntimeError("derivative for aten::something_backward is not implemented")

    monkeypatch.setattr(hawq_mod, "_hv_double_backward", broken)
    est = hutchinson_traces(model, data, profile, iterations=3)
    assert est.hessian == "finite_difference"
    assert all(t == t for t in est.traces)
    with pytest.raises(RuntimeError):
        hutchinson_traces(model, data, profile, iterations=1, hessian="double_backward")
    for name, param in model.named_weights().items():
        assert torch.equal(param, before[name])


def test_omega_formula() -> None:
    eager, data = _tiny()
    model = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    profile = profile_model(model, data)
    bits = [2, 4, 8]
    omega = hawq_sensitivity(model, data, profile, bits, iterations=20, seed=1)
    traces = hutchinson_traces(model, data, profile, iterations=20, seed=1).traces
    weights = model.named_weights()
    for layer, row, trace in zip(profile.layers, omega, traces, strict=True):
        for b, value in zip(bits, row, strict=True):
            err = float(quantization_error(weights[layer.name], b).double().pow(2).sum())
            assert value == pytest.approx(0.5 * max(trace, 0.0) / layer.params * err, rel=1e-9)
        assert row[0] > row[1] > row[2] >= 0.0


def test_tol_stops_early_and_progress() -> None:
    eager, data = _tiny()
    model = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    profile = profile_model(model, data)
    seen: list[tuple[str, float]] = []
    est = hutchinson_traces(
        model,
        data,
        profile,
        iterations=500,
        tol=0.05,
        progress=lambda s, f, m: seen.append((s, f)),
    )
    assert 2 <= est.iterations < 500
    assert {s for s, _ in seen} == {"hawq"}
    assert seen[-1][1] == 1.0
    assert [f for _, f in seen] == sorted(f for _, f in seen)


def _cnn() -> tuple[SmallCNN, CalibrationData]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = CalibrationData([torch.randn(24, 1, 8, 8, generator=g)], torch.randint(0, 10, (24,)))
    return SmallCNN().eval(), data


def _check(model: LoadedModel, data: CalibrationData) -> tuple[ModelProfile, list[list[float]]]:
    profile = profile_model(model, data)
    before = {k: v.detach().clone() for k, v in model.named_weights().items()}
    grads = {k: v.requires_grad for k, v in model.named_weights().items()}
    omega = hawq_sensitivity(model, data, profile, [2, 4, 8], iterations=4, batch_size=10)
    assert len(omega) == len(profile.layers) == 4
    for row in omega:
        assert all(v >= 0.0 and v == v for v in row)
        assert row[0] >= row[1] >= row[2]
    for name, param in model.named_weights().items():
        assert torch.equal(param, before[name]), name
        assert param.requires_grad == grads[name]
    return profile, omega


def test_torchscript_and_export_agree() -> None:
    eager, data = _cnn()
    script = load_model(torchscript_bytes(eager, (data.inputs[0][:2],)))
    exported = load_model(export_bytes(eager, (data.inputs[0][:10],), dynamic_batch=False))
    assert exported.fixed_batch == 10  # 24 samples: the last batch is padded
    _, omega_s = _check(script, data)
    _, omega_e = _check(exported, data)
    for a, b in zip(omega_s, omega_e, strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-12)
    assert any(row[0] > 0 for row in omega_s)
