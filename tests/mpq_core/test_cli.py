"""The ``mpq`` command line end to end: inspect, analyze, allocate, and its error reporting."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpq_core import __version__
from mpq_core.allocation import Allocation
from mpq_core.cli import build_parser, main, run
from mpq_core.sensitivity_table import SensitivityTable
from tests.conftest import zoo_module


def test_inspect_json_lists_every_layer_with_macs(
    cnn_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    assert main(["inspect", str(model), "--data", str(data), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1
    names = [layer["name"] for layer in doc["layers"]]
    assert names == ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]
    # conv1: 4 output channels x 8x8 positions x (1 input channel x 3x3 kernel)
    assert doc["layers"][0]["macs"] == 4 * 8 * 8 * 9
    assert doc["macs_per_sample"] == sum(layer["macs"] for layer in doc["layers"])


def test_inspect_table_names_format_and_totals(
    cnn_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    assert main(["inspect", str(model), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torchscript model, 4 quantizable layers")
    assert "fc.weight" in out and "total:" in out


@pytest.mark.parametrize("method", ["fisher", "kl", "hawq"])
def test_analyze_then_allocate_meets_budget(
    cnn_files: tuple[Path, Path], tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    sens = tmp_path / "sens.json"
    args = [
        "analyze",
        str(model),
        "--data",
        str(data),
        "--analysis.method",
        method,
        "--bits",
        "2,4,8",
    ]
    args += ["--out", str(sens), "--no-progress", "--analysis.hawq-iterations", "4"]
    assert main(args) == 0
    table = SensitivityTable.load(sens)
    assert table.method == method and table.bits == [2, 4, 8]
    assert len(table.omega) == 4 and all(v >= 0 for row in table.omega for v in row)

    alloc_path = tmp_path / "alloc.json"
    cmd = ["allocate", str(sens), "--budget", "avg-bits=3", "--pin", r"conv1\.weight=8"]
    assert main([*cmd, "--out", str(alloc_path)]) == 0
    alloc = Allocation.load(alloc_path)
    bits = alloc.bits_by_layer()
    assert bits["conv1.weight"] == 8
    params = {layer.name: layer.params for layer in table.layers}
    avg = sum(params[n] * b for n, b in bits.items()) / sum(params.values())
    assert avg <= 3.0 + 1e-9
    assert "predicted loss increase" in capsys.readouterr().out


def test_first_order_only_for_fisher(
    cnn_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    out = tmp_path / "s.json"
    rc = main(
        [
            "analyze",
            str(model),
            "--data",
            str(data),
            "--analysis.method",
            "kl",
            "--analysis.first-order",
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    assert "[invalid_spec]" in capsys.readouterr().err
    assert not out.exists()


def test_pickled_model_is_refused_with_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.pt"
    torch.save(zoo_module("mlp"), model)
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((4, 16), np.float32))
    assert main(["inspect", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "[model_pickle]" in err and "torch.jit.save" in err


def test_data_that_does_not_fit_is_refused(
    cnn_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = cnn_files
    data = tmp_path / "bad.npz"
    np.savez(data, input=np.zeros((4, 3, 5, 5), np.float32))
    assert main(["inspect", str(model), "--data", str(data)]) == 2
    assert "[data_mismatch]" in capsys.readouterr().err


def test_infeasible_budget_states_smallest_value(
    cnn_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    sens = tmp_path / "sens.json"
    assert (
        main(["analyze", str(model), "--data", str(data), "--out", str(sens), "--no-progress"]) == 0
    )
    capsys.readouterr()
    assert (
        main(["allocate", str(sens), "--budget", "size=10B", "--out", str(tmp_path / "a.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert "[budget_infeasible]" in err and "smallest achievable" in err
    assert not (tmp_path / "a.json").exists()


def test_missing_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "d.npz")]) == 2
    assert "[file_not_found]" in capsys.readouterr().err


def test_console_script_runs(cnn_files: tuple[Path, Path]) -> None:
    """The installed ``mpq`` entry point (not just ``main``) works and exits 0."""
    model, data = cnn_files
    exe = Path(sys.executable).with_name("mpq")
    proc = subprocess.run(
        [str(exe), "inspect", str(model), "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "mpq.inspect"


def _parser_whose_command_fails() -> argparse.ArgumentParser:
    parser = build_parser(plugins=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("explode")

    def explode(args: argparse.Namespace) -> int:
        raise RuntimeError("shape '[64, 0, 6]' is invalid\nsecond line")

    p.set_defaults(func=explode)
    return parser


def test_an_unexpected_error_is_one_line_with_a_code_never_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(_parser_whose_command_fails(), ["explode"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(
        "mpq: error [internal_error]: RuntimeError: shape '[64, 0, 6]' is invalid"
    )
    assert "Traceback" not in err and "second line" not in err and "--debug" in err

    assert run(_parser_whose_command_fails(), ["--debug", "explode"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "[internal_error]" in err


def test_analyze_under_max_memory_refuses_a_budget_below_one_sample_and_runs_within_one(
    cnn_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = cnn_files
    out = tmp_path / "sens.json"
    args = ["analyze", str(model), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*args, "--max-memory", "64MiB"]) == 2
    assert "[max_memory_too_small]" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--max-memory", "64GiB"]) == 0
    assert SensitivityTable.load(out).names == [
        "conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"
    ]  # fmt: skip


def test_version_names_mpq_and_what_decides_its_results() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mpq_core.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"mpq {re.escape(__version__)}, torch \S+, onnxruntime \S+\n", done.stdout
    ), done.stdout
