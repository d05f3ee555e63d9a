"""``output_key`` reaches everything that scores outputs: the data check, every sensitivity
method, evaluation and fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpq_core.data import CalibrationData
from mpq_core.errors import DataMismatch
from mpq_core.intake import load_model
from mpq_core.pipeline import run
from mpq_core.sensitivity import analyze
from mpq_core.spec import AnalysisSpec, FinetuneSpec, JobSpec, Method
from tests.zoo import torchscript_bytes


class TwoHeads(nn.Module):
    """A 2-class auxiliary head first, the 5-class logits second."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.aux = nn.Linear(16, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"aux": self.aux(h), "logits": self.head(h)}


def _model_bytes() -> bytes:
    torch.manual_seed(0)
    return torchscript_bytes(TwoHeads(), (torch.randn(2, 8),))


def _data(classes: int) -> CalibrationData:
    g = torch.Generator().manual_seed(3)
    return CalibrationData([torch.randn(32, 8, generator=g)], torch.arange(32) % classes)


@pytest.mark.parametrize("method", list(Method))
def test_every_sensitivity_method_scores_the_chosen_output(method: Method) -> None:
    model, data = load_model(_model_bytes()), _data(2)
    analysis = AnalysisSpec(method=method, hawq_iterations=4)
    default = analyze(model, data, analysis, bits=[2, 8], batch_size=16)
    logits = analyze(model, data, analysis, bits=[2, 8], batch_size=16, output_key="logits")
    rows = {
        name: dict(zip(t.names, t.omega, strict=True))
        for name, t in [("d", default), ("l", logits)]
    }
    # Scored on "aux" (the first output) the head does not matter, scored on "logits" aux does not.
    assert rows["d"]["head.weight"] == [0.0, 0.0] and max(rows["d"]["aux.weight"]) > 0
    assert rows["l"]["aux.weight"] == [0.0, 0.0] and max(rows["l"]["head.weight"]) > 0


def test_the_job_checks_and_scores_the_chosen_output() -> None:
    data = _data(5)  # labels 0..4: they fit the logits, not the 2-class aux head
    spec = JobSpec(budgets=["avg-bits=4"], bits=[2, 4, 8], finetune=FinetuneSpec(epochs=1))
    with pytest.raises(DataMismatch):
        run(spec, _model_bytes(), data)
    keyed = JobSpec(
        budgets=["avg-bits=4"], bits=[2, 4, 8], output_key="logits", finetune=FinetuneSpec(epochs=1)
    )
    result = run(keyed, _model_bytes(), data)
    assert result.sensitivity.meta["options"]["output_key"] == "logits"
    assert result.metrics["float"] is not None and result.metrics["float"].accuracy is not None
    assert result.finetune is not None and result.metrics["finetuned"] is not None
