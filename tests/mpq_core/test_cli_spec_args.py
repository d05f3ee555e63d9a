"""CLI flags generated from the job spec: names equal JSON names, the spec's defaults apply,
one bit-list parser; and the ``mpq.commands`` plugin hook."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import mpq_core.cli as cli
from mpq_core.cli.spec_args import flag_name, parse_bits, spec_from_args, spec_values
from mpq_core.errors import SpecError
from mpq_core.spec import AnalysisSpec, FinetuneSpec, JobSpec


def _quantize_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser(plugins=False).parse_args(
        ["quantize", "m.pt", "--data", "d.npz", "--out-dir", "o", *argv]
    )


def _json_paths() -> list[str]:
    paths = []
    for f in fields(JobSpec):
        if f.name in ("analysis", "finetune"):
            part = AnalysisSpec if f.name == "analysis" else FinetuneSpec
            paths += [f"{f.name}.{g.name}" for g in fields(part)]
        else:
            paths.append(f.name)
    return paths


def test_every_spec_field_is_a_quantize_flag_named_like_its_json_path() -> None:
    parser = cli.build_parser(plugins=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {s for a in sub.choices["quantize"]._actions for s in a.option_strings}
    for path in _json_paths():
        assert flag_name(path) in options, path
    assert flag_name("finetune.lr") == "--finetune.lr"
    assert flag_name("batch_size") == "--batch-size"
    assert {"--budget", "--pin", "--tie"} <= options  # singular aliases


def test_flags_not_given_leave_the_spec_defaults() -> None:
    spec = spec_from_args(_quantize_args("--budget", "avg-bits=4"))
    assert spec == JobSpec(budgets=["avg-bits=4"])


def test_command_line_and_json_give_the_same_spec(tmp_path: Path) -> None:
    cost = tmp_path / "lat.json"
    cost.write_text(json.dumps({"schema_version": 1, "layers": {"fc.weight": {"2": 1, "4": 2}}}))
    args = _quantize_args(
        "--budgets", "avg-bits=4", "--budget", "table=3", "--bits", "8,2,4",
        "--pins", r"fc\..*=8", "--pin", "conv1.weight=4", "--tie", "conv.*",
        "--solver", "exact", "--act-bits", "6", "--quantize-activations",
        "--cost-table", str(cost), "--batch-size", "9", "--eval-fraction", "0.3",
        "--output-key", "logits", "--seed", "3", "--device", "cpu",
        "--analysis.method", "fisher", "--analysis.loss", "ce", "--analysis.first-order",
        "--analysis.hawq-iterations", "7", "--finetune.epochs", "2", "--finetune.steps", "11",
        "--finetune.lr", "0.003", "--finetune.batch-size", "5", "--finetune.val-fraction", "0.25",
        "--finetune.patience", "4", "--finetune.distill-weight", "0.5",
        "--finetune.label-weight", "2",
    )  # fmt: skip
    doc: dict[str, Any] = {
        "budgets": ["avg-bits=4", "table=3"],
        "bits": [2, 4, 8],
        "pins": {r"fc\..*": 8, "conv1.weight": 4},
        "ties": ["conv.*"],
        "solver": "exact",
        "act_bits": 6,
        "quantize_activations": True,
        "cost_table": {"fc.weight": {"2": 1.0, "4": 2.0}},
        "batch_size": 9,
        "eval_fraction": 0.3,
        "output_key": "logits",
        "seed": 3,
        "device": "cpu",
        "analysis": {"method": "fisher", "loss": "ce", "first_order": True, "hawq_iterations": 7},
        "finetune": {
            "epochs": 2,
            "steps": 11,
            "lr": 0.003,
            "batch_size": 5,
            "val_fraction": 0.25,
            "patience": 4,
            "distill_weight": 0.5,
            "label_weight": 2.0,
        },
    }
    assert spec_values(args)["analysis"] == doc["analysis"]
    assert spec_from_args(args) == JobSpec.from_dict({"schema_version": 2, **doc})


def test_output_key_digits_are_an_index() -> None:
    args = _quantize_args("--budget", "avg-bits=4", "--output-key", "1")
    assert spec_from_args(args).output_key == 1


@pytest.mark.parametrize(
    ("text", "bits"), [("2,3,4,8", [2, 3, 4, 8]), ("8, 2,2,", [2, 8]), ("4", [4])]
)
def test_one_bit_list_parser(text: str, bits: list[int]) -> None:
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["2,x", ",", ""])
def test_bad_bit_lists_are_spec_errors(text: str) -> None:
    with pytest.raises(SpecError):
        parse_bits(text)


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--budget", "avg-bits=4", "--bits", "2,three"], "invalid_spec"),
        (["--budget", "avg-bits=4", "--pin", "fc.weight"], "invalid_spec"),
        (["--budget", "avg-bits=4", "--finetune.lr", "0"], "spec_out_of_range"),
        (["--budget", "avg-bits=lots"], "invalid_budget"),
    ],
)
def test_bad_values_exit_2_with_a_code(
    argv: list[str], code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quantize", "missing.pt", "--data", "missing.npz", "--out-dir", "o", *argv]
    assert cli.main(args) == 2
    assert f"mpq: error [{code}]" in capsys.readouterr().err


# --- the plugin hook -----------------------------------------------------------------------


class _Entry:
    def __init__(self, name: str, load: Any) -> None:
        self.name = name
        self.load = load


def _register_hello(subparsers: Any) -> None:
    p = subparsers.add_parser("hello", help="say hello")
    p.set_defaults(func=lambda args: print("hello") or 0)


def _missing_extra() -> Any:
    raise ModuleNotFoundError("No module named 'fastapi'")


def test_plugins_add_commands_and_a_broken_import_is_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [_Entry("broken", _missing_extra), _Entry("hello", lambda: _register_hello)]

    def fake_entry_points(*, group: str) -> list[_Entry]:
        assert group == cli.ENTRY_POINT_GROUP == "mpq.commands"
        return entries

    monkeypatch.setattr(cli, "entry_points", fake_entry_points)
    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hello\n"
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"inspect", "analyze", "allocate", "quantize", "sweep", "hello"}


def test_the_service_registers_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    names = {e.value for e in entry_points(group="mpq.commands")}
    assert "api.cli:register" in names, "re-run make install (pyproject's entry points)"
