from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, load_model
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.quant_primitives import fake_quantize
from mpq_core.runner import run_model
from mpq_core.sensitivity.kl import kl_sensitivity, output_divergence
from tests.zoo import SmallCNN, SmallMLP, export_bytes, torchscript_bytes


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


BITS = [2, 3, 4, 6, 8]


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        mean, var = model.bn1.running_mean, model.bn1.running_var
        assert mean is not None and var is not None
        mean.copy_(torch.linspace(-0.2, 0.2, 4))
        var.copy_(torch.linspace(0.5, 1.5, 4))
    return model.eval()


@pytest.fixture(scope="module")
def cnn_data() -> CalibrationData:
    g = torch.Generator().manual_seed(1)
    return CalibrationData([torch.randn(37, 1, 8, 8, generator=g)], torch.randint(0, 10, (37,)))


@pytest.fixture(scope="module")
def cnn_script(cnn_data: CalibrationData) -> tuple[LoadedModel, ModelProfile]:
    model = load_model(torchscript_bytes(_cnn(), (cnn_data.inputs[0][:2],)))
    return model, profile_model(model, cnn_data)


@pytest.fixture(scope="module")
def cnn_omega(
    cnn_script: tuple[LoadedModel, ModelProfile], cnn_data: CalibrationData
) -> list[list[float]]:
    model, profile = cnn_script
    return kl_sensitivity(model, cnn_data, profile, BITS, batch_size=16)


def test_shape_and_non_negative(
    cnn_script: tuple[LoadedModel, ModelProfile], cnn_omega: list[list[float]]
) -> None:
    _, profile = cnn_script
    assert len(cnn_omega) == len(profile.layers) == 4
    for row in cnn_omega:
        assert len(row) == len(BITS)
        assert all(v >= 0.0 and v == v for v in row)
        assert row[0] > 0.0  # 2-bit quantization visibly changes the outputs


def test_decreases_with_bits(cnn_omega: list[list[float]]) -> None:
    for row in cnn_omega:
        for lo, hi in itertools.pairwise(row):
            assert hi <= lo * 1.05 + 1e-9
        # 2 bits is far worse than 8 bits, on every layer
        assert row[-1] < row[0] / 100


def test_matches_direct_recomputation(
    cnn_script: tuple[LoadedModel, ModelProfile],
    cnn_data: CalibrationData,
    cnn_omega: list[list[float]],
) -> None:
    model, profile = cnn_script
    layer_idx, bit_idx = 2, 1  # conv3 at 3 bits
    param = model.named_weights()[profile.layers[layer_idx].name]
    ref = run_model(model, cnn_data)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.copy_(fake_quantize(saved, BITS[bit_idx]))
        quant = run_model(model, cnn_data)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    direct = F.kl_div(
        F.log_softmax(quant.double(), -1),
        F.log_softmax(ref.double(), -1),
        log_target=True,
        reduction="batchmean",
    )
    assert cnn_omega[layer_idx][bit_idx] == pytest.approx(float(direct), rel=1e-6)


def test_weights_restored_bit_exactly(
    cnn_script: tuple[LoadedModel, ModelProfile], cnn_data: CalibrationData
) -> None:
    model, profile = cnn_script
    before = {k: v.detach().clone() for k, v in model.named_weights().items()}
    kl_sensitivity(model, cnn_data, profile, [2, 5], batch_size=16)
    for name, param in model.named_weights().items():
        assert torch.equal(param, before[name]), name


def test_weights_restored_when_interrupted(
    cnn_script: tuple[LoadedModel, ModelProfile], cnn_data: CalibrationData
) -> None:
    model, profile = cnn_script
    before = {k: v.detach().clone() for k, v in model.named_weights().items()}
    calls: list[float] = []

    def progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        calls.append(fraction)
        if len(calls) == 4:  # inside the second layer, with its weight quantized
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kl_sensitivity(model, cnn_data, profile, [2, 4], progress=progress)
    for name, param in model.named_weights().items():
        assert torch.equal(param, before[name]), name


def test_progress(cnn_script: tuple[LoadedModel, ModelProfile], cnn_data: CalibrationData) -> None:
    model, profile = cnn_script
    seen: list[tuple[str, float]] = []
    kl_sensitivity(model, cnn_data, profile, [4], progress=lambda s, f, m: seen.append((s, f)))
    assert {s for s, _ in seen} == {"kl"}
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)


def test_export_with_fixed_batch_matches_torchscript(
    cnn_data: CalibrationData, cnn_omega: list[list[float]]
) -> None:
    # 37 samples in fixed batches of 16: the last batch is padded and the padding ignored.
    model = load_model(export_bytes(_cnn(), (cnn_data.inputs[0][:16],), dynamic_batch=False))
    assert model.fixed_batch == 16
    omega = kl_sensitivity(model, cnn_data, profile_model(model, cnn_data), BITS)
    for got, want in zip(omega, cnn_omega, strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-12)


def test_mse_outputs_use_half_squared_distance() -> None:
    torch.manual_seed(0)
    x = torch.randn(25, 16)
    model = load_model(torchscript_bytes(SmallMLP().eval(), (x[:2],)))
    data = CalibrationData([x])
    profile = profile_model(model, data)
    omega = kl_sensitivity(model, data, profile, [2, 4], loss="mse", batch_size=8)
    param = model.named_weights()[profile.layers[0].name]
    ref = run_model(model, data)
    saved = param.detach().clone()
    with torch.no_grad():
        param.copy_(fake_quantize(saved, 2))
    quant = run_model(model, data)
    with torch.no_grad():
        param.copy_(saved)
    direct = 0.5 * ((quant.double() - ref.double()) ** 2).sum(dim=1).mean()
    assert omega[0][0] == pytest.approx(float(direct), rel=1e-6)
    assert omega[0][1] < omega[0][0]


def test_divergence_sums_over_positions() -> None:
    torch.manual_seed(0)
    ref = torch.randn(3, 5, 4)
    other = ref + 0.3 * torch.randn(3, 5, 4)
    per_sample = output_divergence(ref, other, "ce")
    per_pos = torch.stack(
        [output_divergence(ref[:, t], other[:, t], "ce") for t in range(ref.shape[1])], dim=1
    )
    assert torch.allclose(per_sample, per_pos.sum(dim=1))
    assert torch.equal(output_divergence(ref, ref, "ce"), torch.zeros(3, dtype=torch.float64))


def test_scoring_batch_by_batch_gives_the_table_of_one_batch(
    cnn_script: tuple[LoadedModel, ModelProfile], cnn_data: CalibrationData
) -> None:
    """Every layer and width is scored against one batch's float outputs at a time; the sums
    over batches of 3 must equal scoring the whole set in one batch."""
    model, profile = cnn_script
    whole = kl_sensitivity(model, cnn_data, profile, [2, 4], batch_size=cnn_data.num_samples)
    by_three = kl_sensitivity(model, cnn_data, profile, [2, 4], batch_size=3)
    assert torch.allclose(torch.tensor(by_three), torch.tensor(whole), rtol=1e-4, atol=1e-9)


def test_divergence_in_chunks_equals_the_whole_comparison() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, out = torch.randn(5, 300, 9000, generator=gen), torch.randn(5, 300, 9000, generator=gen)
    chunked = output_divergence(ref, out, "ce")  # 2.7M elements a sample: one per chunk
    whole = F.kl_div(
        F.log_softmax(out.double(), -1), F.log_softmax(ref.double(), -1), log_target=True,
        reduction="none",
    ).sum(-1).sum(-1)  # fmt: skip
    assert torch.allclose(chunked, whole, rtol=1e-9)
