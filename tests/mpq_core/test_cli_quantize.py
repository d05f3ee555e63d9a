"""``mpq quantize`` end to end on a two-input model, TorchScript and torch.export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mpq_core.cli import main
from mpq_core.intake import load_model
from tests.conftest import zoo_data

ARTEFACTS = {
    "model.mpq.safetensors",
    "allocation.json",
    "sensitivity.json",
    "report.json",
    *(f"{plot}.{fmt}" for plot in ("bits", "sensitivity") for fmt in ("svg", "png")),
}
LAYERS = ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "ff.weight", "head.weight"]


def _files(tmp_path: Path, zoo_bytes: Callable[[str, str], bytes], fmt: str) -> tuple[Path, Path]:
    model = tmp_path / ("model.pt2" if fmt == "export" else "model.pt")
    model.write_bytes(zoo_bytes("text", fmt))
    data = zoo_data("text", 40)
    assert data.labels is not None
    npz = tmp_path / "calib.npz"
    np.savez(
        npz,
        input_0=data.inputs[0].numpy(),
        input_1=data.inputs[1].numpy(),
        labels=data.labels.numpy(),
    )
    return model, npz


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        str(model),
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--budget",
        "avg-bits=4",
        "--finetune.epochs",
        "1",
        "--finetune.batch-size",
        "8",
        "--batch-size",
        "16",
        "--no-progress",
        *extra,
    ]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@pytest.mark.parametrize("fmt", ["script", "export"])
def test_quantize_writes_artefacts_and_prints_summary(
    tmp_path: Path,
    zoo_bytes: Callable[[str, str], bytes],
    fmt: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, data = _files(tmp_path, zoo_bytes, fmt)
    out = tmp_path / "out"
    assert main(_args(model, data, out)) == 0
    text = capsys.readouterr().out
    exported = "model.pt2" if fmt == "export" else "model.pt"
    # The scripted text model gets no runtime exports (tests/mpq_core/test_pipeline.py says why).
    runtime = {"model.compressed.pt2", "model.onnx"} if fmt == "export" else set()
    assert {p.name for p in out.iterdir()} == ARTEFACTS | {exported} | runtime
    # The summary says how close each runtime export runs, or why it was not written.
    if runtime:
        assert re.search(r"^model\.onnx: \S+ from the simulated model in onnxruntime, ", text, re.M)
        assert re.search(
            r"^model\.compressed\.pt2: 0 from the simulated model in torch$", text, re.M
        )
    else:
        assert re.search(r"^model\.onnx: not written: torch's ONNX exporter", text, re.M)
    # The exported model is a valid model of the same format.
    assert load_model(out / exported).format == ("export" if fmt == "export" else "torchscript")
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "mpq.report"
    assert report["finetune"]["epochs_run"] == 1
    # Layer bits: one row per layer with its allocated width.
    assert list(report["allocation"]) == LAYERS
    for name, bits in report["allocation"].items():
        assert re.search(rf"^{re.escape(name)}\s+{bits}$", text, re.M), name
    # Budget achieved.
    achieved = report["budgets"][0]["achieved"]
    assert achieved <= 4 + 1e-9
    assert f"budget avg-bits=4 bits: achieved {achieved:.4g}" in text
    # Accuracy before (float, quantized) and after fine-tuning.
    m = report["metrics"]
    row = f"{'accuracy':<12}" + "".join(
        f"{_cell(m[c]['accuracy']):>12}" for c in ("float", "quantized", "finetuned")
    )
    assert row.rstrip() in text.splitlines()
    assert re.search(r"^\s+float\s+quantized\s+finetuned$", text, re.M)
    assert "timings: intake" in text
    assert f"to {out}" in text and "report.json" in text


def test_quantize_json_prints_the_report(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = _files(tmp_path, zoo_bytes, "export")
    out = tmp_path / "out"
    assert main(_args(model, data, out, "--json", "--quantize-activations")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "mpq.report" and report["schema_version"] == 1
    assert report == json.loads((out / "report.json").read_text())
    assert report["spec"]["quantize_activations"] is True
    assert report["spec"]["finetune"]["epochs"] == 1
    assert (out / "encodings.json").is_file()
    assert "encodings.json" in report["artifacts"]


@pytest.mark.parametrize("budget", ["avg-bits=lots", "speed=3", "size=-1MB"])
def test_bad_budget_exits_2(
    tmp_path: Path,
    zoo_bytes: Callable[[str, str], bytes],
    capsys: pytest.CaptureFixture[str],
    budget: str,
) -> None:
    model, data = _files(tmp_path, zoo_bytes, "script")
    out = tmp_path / "out"
    args = _args(model, data, out)
    args[args.index("avg-bits=4")] = budget
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "[invalid_budget]" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_mismatching_data_exits_2(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = _files(tmp_path, zoo_bytes, "script")
    single = tmp_path / "single.npz"
    np.savez(single, input=zoo_data("text", 8).inputs[0].numpy())
    assert main(_args(model, single, tmp_path / "out")) == 2
    assert "[data_input_count]" in capsys.readouterr().err
