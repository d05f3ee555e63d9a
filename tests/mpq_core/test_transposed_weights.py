"""Weights stored ``(in, out)`` (GPT-2's ``Conv1D``, transposed convolutions) are quantized as
every other weight is: one scale per output channel (their dim 1), groups along the input
dimension (their dim 0), through sensitivities, quantization, fine-tuning and the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_core.data import CalibrationData
from mpq_core.finetune import finetune
from mpq_core.intake import LoadedModel, load_model
from mpq_core.layers import transposed_names
from mpq_core.packed_checkpoint import load_packed_checkpoint, restore_into
from mpq_core.pipeline import quantize_model
from mpq_core.profiling import profile_model
from mpq_core.quant_primitives import output_major, qmax
from mpq_core.quantized_weights import quantize_weights
from mpq_core.report import scheme_report
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity import analyze
from mpq_core.sensitivity.layer_errors import LayerErrors
from mpq_core.spec import FinetuneSpec, JobSpec
from tests.conftest import save_bytes, stock_load
from tests.mpq_core.test_schemes import grouped_asymmetric_spec

IN, OUT = 64, 16
LOUD = 3  # the output channel made 100 times larger than the others


class _Conv1DNet(nn.Module):
    """Two GPT-2-style ``Conv1D`` projections (``x @ W + b`` with ``W`` stored (in, out)) and a
    plain ``nn.Linear`` head."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(IN, OUT, generator=g) * 0.1
        w[:, LOUD] *= 100.0
        self.proj_w = nn.Parameter(w)
        self.proj_b = nn.Parameter(torch.zeros(OUT))
        self.up_w = nn.Parameter(torch.randn(OUT, 96, generator=g) * 0.1)
        self.up_b = nn.Parameter(torch.zeros(96))
        self.head = nn.Linear(96, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.addmm(self.proj_b, x, self.proj_w))
        h = torch.relu(torch.addmm(self.up_b, h, self.up_w))
        return self.head(h)


def _model() -> tuple[bytes, CalibrationData]:
    torch.manual_seed(1)
    x = torch.randn(48, IN)
    data = CalibrationData(inputs=[x], labels=torch.randint(0, 5, (48,)))
    return save_bytes(_Conv1DNet().eval(), (x[:2],), "script"), data


def _loaded() -> tuple[LoadedModel, CalibrationData]:
    archive, data = _model()
    return load_model(archive), data


def test_the_profile_marks_weights_stored_in_out_and_counts_their_output_channels() -> None:
    model, data = _loaded()
    layers = {layer.name: layer for layer in profile_model(model, data).layers}
    assert layers["proj_w"].transposed and layers["up_w"].transposed
    assert not layers["head.weight"].transposed
    assert layers["proj_w"].channels == OUT and layers["proj_w"].quant_shape == (OUT, IN)
    assert layers["up_w"].channels == 96 and layers["head.weight"].channels == 5
    assert transposed_names(layers.values()) == {"proj_w", "up_w"}


def _column_errors(model: LoadedModel, transposed: frozenset[str]) -> torch.Tensor:
    """Relative error of each output channel (column) of ``proj_w`` at 4 bits."""
    w = model.named_weights()["proj_w"].detach()
    layer = quantize_weights(model, {"proj_w": 4}, transposed=transposed)["proj_w"]
    return (layer.dequantized() - w).norm(dim=0) / w.norm(dim=0)


def test_each_output_channel_of_a_transposed_weight_gets_its_own_scale() -> None:
    model, _ = _loaded()
    layer = quantize_weights(model, {"proj_w": 4}, transposed={"proj_w"})["proj_w"]
    assert layer.transposed and layer.shape == (IN, OUT)
    assert tuple(layer.scales.shape) == (OUT,) and tuple(layer.codes.shape) == (OUT, IN)
    quiet = [j for j in range(OUT) if j != LOUD]
    errors = _column_errors(model, frozenset({"proj_w"}))
    assert float(errors[quiet].max()) < 0.2  # 4-bit error of a channel on its own scale
    # Scaled along the stored rows (input channels) instead, the loud channel sets every
    # scale and the quiet channels round to almost nothing.
    along_inputs = _column_errors(model, frozenset())
    assert float(along_inputs[quiet].min()) > 0.5


def test_groups_of_a_transposed_weight_run_along_its_input_dimension() -> None:
    model, _ = _loaded()
    w = model.named_weights()["proj_w"].detach()
    scheme = QuantScheme(group_size=32)
    layer = quantize_weights(model, {"proj_w": 4}, scheme=scheme, transposed={"proj_w"})["proj_w"]
    assert tuple(layer.scales.shape) == (OUT, IN // 32)
    # Each scale covers 32 consecutive input rows of one output column.
    for j in range(OUT):
        for g in range(IN // 32):
            block = w[32 * g : 32 * (g + 1), j]
            assert float(layer.scales[j, g]) <= float(block.abs().max()) / qmax(4) * 1.001


@pytest.mark.parametrize("scheme", [QuantScheme(), QuantScheme(group_size=32, symmetric=False)])
def test_layer_errors_of_a_transposed_weight_are_those_of_its_quantized_weight(
    scheme: QuantScheme,
) -> None:
    model, _ = _loaded()
    weights = model.named_weights()
    errors = LayerErrors(weights, ["proj_w"], [2, 4], scheme, transposed={"proj_w"})
    stack = errors["proj_w"]
    assert tuple(stack.shape) == (2, IN, OUT)
    for j, bits in enumerate([2, 4]):
        layer = quantize_weights(model, {"proj_w": bits}, scheme=scheme, transposed={"proj_w"})
        want = layer["proj_w"].dequantized() - weights["proj_w"].detach()
        assert torch.allclose(stack[j], want, atol=1e-6)


def test_a_job_quantizes_conv1d_weights_per_output_channel_end_to_end(tmp_path: Path) -> None:
    archive, data = _model()
    spec = grouped_asymmetric_spec()
    result = quantize_model(archive, data, spec, tmp_path / "job", eval_source=data)
    ck = load_packed_checkpoint(result.out_dir)
    proj = ck.layers["proj_w"]
    assert proj.transposed and tuple(proj.scales.shape) == (OUT, IN // 32)
    assert not ck.layers["head.weight"].transposed
    # Fine-tuning kept the weights on their output channels' grids; the checkpoint restores
    # the written model bit for bit.
    fresh = load_model(archive)
    restore_into(fresh, ck)
    exported = dict(stock_load(result.out_dir / "model.pt", "script").named_parameters())
    for name, p in fresh.named_weights().items():
        assert torch.equal(p.detach(), exported[name].detach()), name
    w = output_major(fresh.named_weights()["proj_w"].detach(), True)  # (out, in)
    assert proj.zeros is not None
    steps = w.reshape(OUT, IN // 32, 32) / proj.scales[..., None]
    codes = steps + proj.zeros[..., None].float()
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_a_table_that_scaled_transposed_weights_along_inputs_is_computed_again(
    tmp_path: Path,
) -> None:
    archive, data = _model()
    spec = JobSpec(budgets=["avg-bits=4"], bits=[2, 4, 8], finetune=FinetuneSpec(epochs=0))
    model = load_model(archive)
    table = analyze(model, data, spec)
    assert table.meta["scales_along"] == "output"
    old = type(table).from_dict(table.to_dict())
    del old.meta["scales_along"]  # as tables written before this change are
    result = quantize_model(archive, data, spec, tmp_path / "job", sensitivity=old)
    assert any("computed again" in note for note in result.report["notes"])
    reused = quantize_model(archive, data, spec, tmp_path / "again", sensitivity=table)
    assert not any("computed again" in note for note in reused.report.get("notes", []))


def test_fine_tuning_holds_a_transposed_weight_on_its_output_channels_grid() -> None:
    model, data = _loaded()
    scheme = QuantScheme(group_size=32)
    layers = quantize_weights(model, {"proj_w": 3}, scheme=scheme, transposed={"proj_w"})
    scales = {"proj_w": layers["proj_w"].scales}
    finetune(
        model,
        data,
        {"proj_w": 3},
        scales,
        FinetuneSpec(epochs=2, batch_size=8, lr=1e-2),
        transposed={"proj_w"},
    )
    w = output_major(model.named_weights()["proj_w"].detach(), True)  # (out, in)
    steps = w.reshape(OUT, IN // 32, 32) / scales["proj_w"][..., None]
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert float(steps.abs().max()) <= qmax(3) + 1e-3


def test_the_report_names_the_layers_left_per_channel_by_their_input_dimension() -> None:
    model, data = _loaded()
    layers = profile_model(model, data).layers
    # proj_w: 64 inputs (two groups of 32); up_w: 16 inputs (too few); head: 96 (three).
    report = scheme_report(QuantScheme(group_size=32), layers)
    assert report["per_channel_layers"] == ["up_w"]
