"""The engine's public API: lazy names, and the README's Python example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import mpq_core
from tests.conftest import zoo_data

README = Path(__file__).resolve().parents[2] / "README.md"


def test_importing_the_package_and_pure_modules_loads_no_torch() -> None:
    code = (
        "import sys, mpq_core, mpq_core.spec, mpq_core.allocation; "
        "mpq_core.JobSpec(budgets=['avg-bits=3']); mpq_core.SpecError; mpq_core.Allocation; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "the public API's pure names imported torch"


def test_every_public_name_resolves() -> None:
    assert sorted(mpq_core.__all__) == sorted(["__version__", *mpq_core._EXPORTS])
    for name in mpq_core._EXPORTS:
        assert getattr(mpq_core, name) is not None, name
    assert mpq_core.quantize is mpq_core.pipeline.run
    assert set(mpq_core._EXPORTS) <= set(dir(mpq_core))
    with pytest.raises(AttributeError):
        _ = mpq_core.no_such_name


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "import mpq_core as mpq" in b)
    body = [line for line in example.splitlines()[1:] if line.strip()]
    assert len(body) == 5, "the README promises a five-line example"
    return example


def test_readme_python_example_runs(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.pt").write_bytes(zoo_bytes("cnn", "script"))
    data = zoo_data("cnn", 40)
    assert data.labels is not None
    np.savez(tmp_path / "calib.npz", input=data.inputs[0].numpy(), labels=data.labels.numpy())
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(_readme_example(), str(README), "exec"), scope)

    result = scope["result"]
    allocation = scope["allocation"]
    assert isinstance(result, mpq_core.JobResult)
    assert isinstance(allocation, mpq_core.Allocation)
    assert result.allocation.bits_by_layer() == allocation.bits_by_layer()
    assert result.report["budgets"][0]["achieved"] <= 4 + 1e-9
    assert result.metrics["finetuned"] is not None and result.finetune is not None
    # In memory: nothing written, and the model holds the dequantized weights.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.pt"]
    weights = result.model.named_weights()
    for name, layer in result.layers.items():
        assert torch.equal(
            weights[name].detach().cpu(), layer.dequantized().to(weights[name].dtype)
        )
    # The writer adds the files and the export stage.
    artifacts = mpq_core.write_artifacts(result, tmp_path / "out")
    assert "model.pt" in artifacts and "report.json" in artifacts
    assert "export" in result.report["timings"]
    assert result.report["sizes"]["packed_checkpoint_bytes"] > 0
