"""The trade-off curve: a sweep's points, curve.json, the job's sweep stage and ``mpq sweep``."""

from __future__ import annotations

import itertools
import json
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mpq_core.allocation import allocate_bits
from mpq_core.cli import main
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import load_model
from mpq_core.packed_checkpoint import job_metadata, packed_file_bytes, save_packed_checkpoint
from mpq_core.pipeline import PipelineResult, quantize_model
from mpq_core.plots import methods_figure, save_figure
from mpq_core.quantized_weights import quantize_weights
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import FinetuneSpec, JobSpec
from mpq_core.sweep import run_sweep, sweep
from mpq_core.sweep_plan import MAX_SWEEP_POINTS, Curve, parse_sweep, predicted_size
from tests.conftest import zoo_data
from tests.mpq_core.conftest import write_cnn_files

# Sizes of the packed checkpoint as written: about 560 B of header beside 350-760 B of weights.
SWEEP = ["avg-bits=2:8:1", "size=980B:1260B:70B", "size=100B"]
BITS = [2, 3, 4, 5, 6, 8]


def _spec(**overrides: object) -> JobSpec:
    kwargs: dict[str, object] = {
        "budgets": ["avg-bits=3.5"],
        "batch_size": 16,
        "finetune": FinetuneSpec(epochs=0),
        **overrides,
    }
    return JobSpec(**kwargs)  # type: ignore[arg-type]


@dataclass
class Jobs:
    swept: PipelineResult
    plain: PipelineResult
    data: CalibrationData
    test: CalibrationData

    @property
    def curve(self) -> Curve:
        assert self.swept.curve is not None
        return self.swept.curve


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, zoo_bytes: Callable[[str, str], bytes]) -> Jobs:
    """The same job with and without a sweep; evaluation data without labels, so the loss is
    the KL divergence to the float model (no label noise in the measured rises)."""
    model = zoo_bytes("cnn", "script")
    data, test = zoo_data("cnn", 48), zoo_data("cnn", 32, seed=7, labels=False)
    swept = quantize_model(
        model, data, _spec(sweep=SWEEP), tmp_path_factory.mktemp("swept"), eval_source=test
    )
    plain = quantize_model(model, data, _spec(), tmp_path_factory.mktemp("plain"), eval_source=test)
    return Jobs(swept, plain, data, test)


# --- the points ------------------------------------------------------------------------------


def test_a_stored_table_holds_size_budgets_on_the_file_without_the_model(
    jobs: Jobs, zoo_bytes: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    """``mpq allocate`` (and the API) re-solve a stored table with no model at hand: the bound
    on the header the job kept in sensitivity.json keeps every size budget on the file."""
    stored = SensitivityTable.load(jobs.swept.out_dir / "sensitivity.json")
    overhead = stored.checkpoint_overhead_bytes
    assert overhead is not None and 500 < overhead < 800
    model = load_model(zoo_bytes("cnn", "script"))
    meta = job_metadata(model)
    rng = np.random.default_rng(0)
    for _ in range(20):  # the bound holds for any allocation, not only uniform ones
        bits = {name: int(rng.choice(BITS)) for name in stored.names}
        predicted = predicted_size(stored, [bits[n] for n in stored.names])[0]
        assert packed_file_bytes(model, bits, metadata=meta) <= predicted + overhead
    for budget in parse_sweep(["size=980B:1260B:70B"]):
        alloc = allocate_bits(stored, [budget], bits=BITS)
        layers = quantize_weights(model, alloc.bits_by_layer())
        written = save_packed_checkpoint(tmp_path / "p.safetensors", model, layers, metadata=meta)
        assert written <= budget.value, budget.label()


def test_size_budgets_hold_on_the_written_checkpoint(
    jobs: Jobs, zoo_bytes: Callable[[str, str], bytes], tmp_path: Path
) -> None:
    """Every size budget of the sweep, and the job's own, holds on the file as written (header
    included); solved on the cost model alone, the header would break them."""
    model = load_model(zoo_bytes("cnn", "script"))
    sized = [p for p in jobs.curve.mixed if p.budget is not None and p.budget.kind == "size"]
    assert len(sized) == 5
    for point in sized:
        assert point.budget is not None
        bits = dict(zip(jobs.curve.layers, point.bits, strict=True))
        layers = quantize_weights(model, bits)
        meta = job_metadata(model)
        written = save_packed_checkpoint(tmp_path / "p.safetensors", model, layers, metadata=meta)
        assert written <= point.budget.value, point.label
        assert written == packed_file_bytes(model, bits, metadata=meta) == point.file_bytes
        cost_model_only = replace(jobs.swept.sensitivity, checkpoint_overhead_bytes=None)
        blind = allocate_bits(cost_model_only, [point.budget], bits=BITS)
        blind_bits = blind.bits_by_layer()
        assert packed_file_bytes(model, blind_bits, metadata=meta) > point.budget.value

    chosen = jobs.curve.chosen
    assert chosen is not None
    assert chosen.file_bytes == (jobs.swept.out_dir / "model.mpq.safetensors").stat().st_size

    spec = _spec(budgets=["size=1100B"])
    quantize_model(zoo_bytes("cnn", "script"), jobs.data, spec, tmp_path / "job")
    assert (tmp_path / "job" / "model.mpq.safetensors").stat().st_size <= 1100


def test_mixed_points_keep_their_budgets(jobs: Jobs) -> None:
    mixed = jobs.curve.mixed
    assert [p.label for p in mixed] == [b.label() for b in parse_sweep(SWEEP[:2])]
    for p in mixed:
        assert p.budget is not None and p.series == "mixed"
        if p.budget.kind == "avg-bits":
            assert p.avg_bits <= p.budget.value + 1e-9
        else:
            assert p.size_bytes <= p.budget.value
    for kind in ("avg-bits", "size"):
        of_kind = [p for p in mixed if p.budget is not None and p.budget.kind == kind]
        assert len(of_kind) >= 4
        # A larger budget never predicts more harm, nor takes less room.
        predicted = [p.predicted_loss_increase for p in of_kind]
        assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(predicted))
        sizes = [p.size_bytes for p in of_kind]
        assert sizes == sorted(sizes)


def test_uniform_points_put_every_layer_at_their_width(jobs: Jobs) -> None:
    curve = jobs.curve
    assert [p.uniform_bits for p in curve.uniform] == BITS
    for p in curve.uniform:
        assert p.bits == [p.uniform_bits] * len(curve.layers)
        assert p.avg_bits == pytest.approx(p.uniform_bits)


def test_measured_rise_shrinks_with_bits(jobs: Jobs) -> None:
    rise = {p.uniform_bits: p.measured_loss_increase for p in jobs.curve.uniform}
    assert all(v is not None and v >= 0 for v in rise.values())  # KL to the float model
    assert rise[8] < 0.05 * rise[2]  # type: ignore[operator]
    assert rise[2] > 0  # type: ignore[operator]


def test_chosen_point_is_the_jobs_own_allocation(jobs: Jobs) -> None:
    chosen, report = jobs.curve.chosen, jobs.swept.report
    assert chosen is not None and chosen.chosen
    assert dict(zip(jobs.curve.layers, chosen.bits, strict=True)) == report["allocation"]
    assert chosen.measured_loss_increase == report["measured_loss_increase"]["eval"]
    assert chosen.size_bytes == report["sizes"]["predicted_bytes"]
    assert chosen.predicted_loss_increase == report["predicted_loss_increase"]
    assert chosen.label == "avg-bits=3.5 bits"


def test_a_budget_that_cannot_be_met_is_skipped_with_its_reason(jobs: Jobs) -> None:
    (skipped,) = jobs.curve.skipped
    assert skipped["label"] == "size=100 B"
    assert "cannot be met" in skipped["reason"]
    assert any(
        note.startswith("sweep: size=100 B cannot be met") for note in jobs.swept.report["notes"]
    )


def test_the_sweep_leaves_the_job_unchanged(jobs: Jobs) -> None:
    swept, plain = jobs.swept, jobs.plain
    # The packed checkpoints: the same header (its metadata's order varies) and the same bytes.
    packed = [(r.out_dir / "model.mpq.safetensors").read_bytes() for r in (swept, plain)]
    ends = [8 + struct.unpack("<Q", b[:8])[0] for b in packed]
    assert json.loads(packed[0][8 : ends[0]]) == json.loads(packed[1][8 : ends[1]])
    assert packed[0][ends[0] :] == packed[1][ends[1] :]
    allocs = [json.loads((r.out_dir / "allocation.json").read_text()) for r in (swept, plain)]
    for key in ("layers", "budgets", "predicted_loss_increase"):
        assert allocs[0][key] == allocs[1][key]
    assert swept.report["metrics"] == plain.report["metrics"]
    assert "sweep" in swept.report["timings"] and "sweep" not in plain.report["timings"]
    assert plain.curve is None and not (plain.out_dir / "curve.json").exists()


# --- curve.json ------------------------------------------------------------------------------


def test_methods_figure_draws_each_method_beside_the_uniform_widths(
    jobs: Jobs, tmp_path: Path
) -> None:
    kl = replace(jobs.curve, method="kl", mixed=jobs.curve.mixed[:3])
    fig = methods_figure([jobs.curve, kl])
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:3] == ["uniform", "fisher", "kl"]
        lines = {line.get_label(): line for line in ax.lines}
        assert len(lines["kl"].get_xdata()) == 3
        assert len(lines["uniform"].get_xdata()) == len(jobs.curve.uniform)
    files = save_figure(fig, tmp_path / "methods")
    ET.parse(files["methods.svg"])
    assert files["methods.png"].read_bytes().startswith(b"\x89PNG")


def test_curve_json_round_trips_with_its_documented_keys(jobs: Jobs) -> None:
    path = jobs.swept.artifacts["curve.json"]
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "mpq.curve"
    assert doc["method"] == "fisher" and doc["metric"] == "sqnr_db"
    assert set(doc["points"]) == {"mixed", "uniform"}
    assert doc["chosen"]["chosen"] is True
    point_keys = {
        "series",
        "label",
        "budget",
        "uniform_bits",
        "chosen",
        "size_bytes",
        "file_bytes",
        "avg_bits",
        "predicted_loss_increase",
        "predicted_metric_loss_increase",
        "measured_loss_increase",
        "metrics",
        "bits",
    }
    assert all(set(p) == point_keys for p in doc["points"]["mixed"] + doc["points"]["uniform"])
    assert doc["points"]["mixed"][0]["budget"] == {
        "kind": "avg-bits",
        "value": 2.0,
        "label": "avg-bits=2 bits",
    }
    again = Curve.load(path)
    assert again.to_dict() == doc
    assert "curve.json" in jobs.swept.report["artifacts"]
    svg = ET.parse(jobs.swept.artifacts["curve.svg"]).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert jobs.swept.artifacts["curve.png"].read_bytes().startswith(b"\x89PNG")


def test_a_malformed_curve_is_refused() -> None:
    with pytest.raises(SpecError, match="not an mpq curve"):
        Curve.from_dict({"kind": "mpq.report"})
    with pytest.raises(SpecError, match="malformed curve"):
        Curve.from_dict({"kind": "mpq.curve", "schema_version": 1})


# --- the sweep on its own --------------------------------------------------------------------


def test_sweep_restores_the_float_weights_bit_for_bit(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(zoo_bytes("text", "script"))
    model = load_model(path)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    spec = _spec(sweep=["avg-bits=2:4:1"], bits=[2, 4, 8])
    result = run_sweep(spec, model, zoo_data("text", 24), eval_data=zoo_data("text", 8))
    after = dict(model.module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert [p.uniform_bits for p in result.curve.uniform] == [2, 4, 8]
    assert result.curve.chosen is not None and result.allocation is not None
    assert result.curve.chosen.bits == [la.bits for la in result.allocation.layers]
    # Measured again on the float weights left behind: the same numbers.
    again = sweep(model, result.sensitivity, zoo_data("text", 8), spec)
    assert [p.to_dict() for p in again.mixed] == [p.to_dict() for p in result.curve.mixed]


# --- the spec --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sweep_entries", "message", "code"),
    [
        (["avg-bits=2:8"], "KIND=START:STOP:STEP", "invalid_spec"),
        (["avg-bits=8:2:1"], "START <= STOP and a positive STEP", "invalid_spec"),
        (["avg-bits=2:8:0"], "sweep entry 'avg-bits=2:8:0'", "invalid_budget"),
        (["speed=2:8:1"], "unknown kind 'speed'", "invalid_budget"),
        (["avg-bits=1:100:0.1"], f"at most {MAX_SWEEP_POINTS}", "spec_too_large"),
        ("avg-bits=2:8:1", "must be a list of strings", "spec_type"),
    ],
)
def test_a_bad_sweep_is_refused_with_a_clear_error(
    sweep_entries: object, message: str, code: str
) -> None:
    with pytest.raises(SpecError, match=message) as info:
        JobSpec(budgets=["avg-bits=4"], sweep=sweep_entries)  # type: ignore[arg-type]
    assert info.value.code == code


def test_sweep_ranges_expand_in_their_units() -> None:
    spec = _spec(sweep=["size=1MB:2MB:0.5MB", "compression=4x", "avg-bits=3"])
    assert [b.label() for b in spec.parsed_sweep()] == [
        "size=1 MB",
        "size=1.5 MB",
        "size=2 MB",
        "compression=4x",
        "avg-bits=3 bits",
    ]
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert JobSpec(budgets=["avg-bits=4"]).to_dict()["sweep"] == []


# --- mpq sweep -------------------------------------------------------------------------------


def test_mpq_sweep_end_to_end(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    model, npz = write_cnn_files(tmp_path, zoo_bytes, 40)
    out = tmp_path / "out"
    args = ["sweep", str(model), "--data", str(npz), "--out-dir", str(out), "--no-progress"]
    argv = [*args, "--sweep", "avg-bits=2:6:2", "--budget", "avg-bits=3", "--bits", "2,4,8"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {
        "curve.json",
        "sensitivity.json",
        *(f"{stem}.{fmt}" for stem in ("curve", "bits", "sensitivity") for fmt in ("svg", "png")),
    }
    curve = Curve.load(out / "curve.json")
    assert curve.metric == "accuracy"
    assert [p.label for p in curve.mixed] == [
        "avg-bits=2 bits",
        "avg-bits=4 bits",
        "avg-bits=6 bits",
    ]
    rows = [line.split() for line in text.splitlines()]
    assert sum(row[:1] == ["mixed"] for row in rows) == 3
    assert sum(row[:1] == ["uniform"] for row in rows) == 3
    assert sum(row[:1] == ["chosen"] for row in rows) == 1

    # Again from the stored table, no budget to mark: no bits plot, no chosen point.
    again = tmp_path / "again"
    stored = ["--sensitivity", str(out / "sensitivity.json"), "--bits", "2,4,8"]
    args[args.index(str(out))] = str(again)
    assert main([*args, "--sweep", "avg-bits=3", *stored]) == 0
    assert Curve.load(again / "curve.json").chosen is None
    assert not (again / "bits.svg").exists()


def test_mpq_sweep_bad_range_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "m.pt", "--data", "d.npz", "--out-dir", str(tmp_path / "o")]
    assert main([*argv, "--sweep", "avg-bits=2:8"]) == 2
    assert "[invalid_spec]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
