from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_core.allocation import Allocation, allocate_bits, monotone_envelope
from mpq_core.budgets import Budget, achieved, parse_budget
from mpq_core.cli.allocate import add_parser, run
from mpq_core.errors import BudgetInfeasible, SpecError
from mpq_core.layers import LayerInfo
from mpq_core.sensitivity_table import SensitivityTable

BITS = [2, 3, 4, 8]


def _table(seed: int = 0, n: int = 6, float_params: int = 500) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    layers = []
    omega = []
    for i in range(n):
        out_ch = int(rng.integers(4, 64))
        fan_in = int(rng.integers(8, 512))
        name = "classifier.weight" if i == n - 1 else f"features.{i}.weight"
        kind = "linear" if i == n - 1 else "conv2d"
        layers.append(
            LayerInfo(name, kind, (out_ch, fan_in), out_ch * fan_in, out_ch, out_ch * fan_in * 9)
        )
        scale = float(rng.lognormal(0, 1))
        omega.append([scale * 4.0 ** (-b) for b in BITS])
    return SensitivityTable(
        method="fisher", bits=list(BITS), layers=layers, omega=omega, float_params=float_params
    )


def test_allocation_meets_avg_bits_and_reports_it() -> None:
    table = _table()
    alloc = allocate_bits(table, [Budget("avg-bits", 3.0)])
    assert [la.name for la in alloc.layers] == table.names
    avg = achieved(Budget("avg-bits", 3.0), table.layers, 0, [la.bits for la in alloc.layers])
    assert alloc.budgets[0].achieved == pytest.approx(avg)
    assert avg <= 3.0 + 1e-9
    assert alloc.predicted_loss_increase == pytest.approx(
        sum(la.omega[la.bits] for la in alloc.layers)
    )
    assert all(la.bits in BITS for la in alloc.layers)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    kind=st.sampled_from(["avg-bits", "size", "compression", "bitops"]),
    frac=st.floats(0.05, 1.0),
    solver=st.sampled_from(["greedy", "exact", "auto"]),
)
def test_every_budget_kind_is_met(seed: int, kind: str, frac: float, solver: str) -> None:
    table = _table(seed)
    lo_bits, hi_bits = [BITS[0]] * len(table.layers), [BITS[-1]] * len(table.layers)
    probe = Budget(kind, 1.0)
    lo, hi = (achieved(probe, table.layers, table.float_params, b) for b in (lo_bits, hi_bits))
    value = lo + frac * (hi - lo)  # between the cheapest and the dearest allocation
    budget = Budget(kind, value)
    alloc = allocate_bits(table, [budget], solver=solver)
    got = alloc.budgets[0].achieved
    if kind == "compression":
        assert got >= value * (1 - 1e-9)
    else:
        assert got <= value * (1 + 1e-9)


def test_size_infeasible_message_states_smallest_achievable() -> None:
    table = _table()
    smallest = achieved(Budget("size", 1.0), table.layers, table.float_params, [2] * 6)
    with pytest.raises(BudgetInfeasible) as err:
        allocate_bits(table, [parse_budget("size=10B")])
    msg = err.value.message
    assert msg.startswith("size=10 B cannot be met")
    assert f"{smallest / 1000:.4g} KB" in msg
    assert "all layers at 2 bits" in msg


def test_compression_infeasible_message_states_highest_achievable() -> None:
    table = _table()
    best = achieved(Budget("compression", 1.0), table.layers, table.float_params, [2] * 6)
    with pytest.raises(BudgetInfeasible, match=f"highest achievable is {best:.4g}x"):
        allocate_bits(table, [Budget("compression", 100.0)])


def test_infeasible_message_accounts_for_pins() -> None:
    table = _table()
    pinned = [8] + [2] * 5
    smallest = achieved(Budget("avg-bits", 1.0), table.layers, 0, pinned)
    with pytest.raises(BudgetInfeasible) as err:
        allocate_bits(table, [Budget("avg-bits", 2.0)], pins={r"features\.0\.weight": 8})
    assert f"{smallest:.4g} bits" in err.value.message
    assert "pins included" in err.value.message


def test_pins_are_honoured() -> None:
    table = _table()
    alloc = allocate_bits(
        table,
        [Budget("avg-bits", 5.0)],
        pins={r"features\.0\.weight": 8, r"classifier\..*": 2},
    )
    bits = alloc.bits_by_layer()
    assert bits["features.0.weight"] == 8
    assert bits["classifier.weight"] == 2


def test_pin_errors_are_spec_errors() -> None:
    table = _table()
    budget = [Budget("avg-bits", 4.0)]
    with pytest.raises(SpecError, match="not a candidate"):
        allocate_bits(table, budget, pins={"features.0.weight": 5})
    with pytest.raises(SpecError, match="matches no layer"):
        allocate_bits(table, budget, pins={"nothing.*": 4})
    with pytest.raises(SpecError, match="not a valid regex"):
        allocate_bits(table, budget, pins={"features.(": 4})
    with pytest.raises(SpecError, match="pinned to both"):
        allocate_bits(table, budget, pins={"features.0.weight": 4, r"features\.0\..*": 8})
    # fullmatch: a prefix is not enough
    with pytest.raises(SpecError, match="matches no layer"):
        allocate_bits(table, budget, pins={"features": 4})


def test_ties_share_one_bit_width() -> None:
    table = _table(3)
    free = allocate_bits(table, [Budget("avg-bits", 3.0)], solver="exact")
    tied = allocate_bits(table, [Budget("avg-bits", 3.0)], ties=[r"features\..*"], solver="exact")
    bits = [la.bits for la in tied.layers if la.name.startswith("features.")]
    assert len(set(bits)) == 1
    assert tied.budgets[0].achieved <= 3.0 + 1e-9
    assert tied.predicted_loss_increase >= free.predicted_loss_increase - 1e-12
    with pytest.raises(SpecError, match="matches no layer"):
        allocate_bits(table, [Budget("avg-bits", 3.0)], ties=["conv.*"])


def test_tie_with_conflicting_pins_is_rejected() -> None:
    table = _table()
    with pytest.raises(SpecError, match="different bit"):
        allocate_bits(
            table,
            [Budget("avg-bits", 4.0)],
            pins={r"features\.0\.weight": 8, r"features\.1\.weight": 2},
            ties=[r"features\.[01]\.weight"],
        )


def test_candidate_bits_restrict_the_choice() -> None:
    table = _table()
    alloc = allocate_bits(table, [Budget("avg-bits", 6.0)], bits=[2, 4])
    assert {la.bits for la in alloc.layers} <= {2, 4}
    assert alloc.candidate_bits == [2, 4]
    with pytest.raises(SpecError, match="not in the sensitivity table"):
        allocate_bits(table, [Budget("avg-bits", 6.0)], bits=[2, 5])


def test_several_budgets_are_all_met() -> None:
    table = _table(5)
    budgets = [Budget("avg-bits", 4.0), Budget("bitops", 1.0)]
    lo = achieved(Budget("bitops", 1.0), table.layers, 0, [2] * 6)
    budgets[1] = Budget("bitops", lo * 1.8)
    for solver in ("greedy", "exact", "auto"):
        alloc = allocate_bits(table, budgets, solver=solver)
        assert alloc.budgets[0].achieved <= 4.0 + 1e-9
        assert alloc.budgets[1].achieved <= lo * 1.8 * (1 + 1e-9)
        assert len(alloc.layers[0].costs) == 2


def test_table_budget_uses_user_costs(tmp_path: Path) -> None:
    table = _table()
    costs = {la.name: {b: float(b) for b in BITS} for la in table.layers}
    alloc = allocate_bits(table, [Budget("table", 18.0, table=costs)])
    assert sum(la.bits for la in alloc.layers) <= 18
    assert alloc.budgets[0].achieved == pytest.approx(sum(la.bits for la in alloc.layers))


def test_allocation_json_round_trip(tmp_path: Path) -> None:
    table = _table()
    alloc = allocate_bits(
        table,
        [Budget("size", 60_000.0), Budget("avg-bits", 4.0)],
        pins={r"classifier\.weight": 8},
        ties=[r"features\.[12]\.weight"],
    )
    d = alloc.to_dict()
    assert d["schema_version"] == 1 and d["kind"] == "mpq.allocation"
    path = tmp_path / "alloc.json"
    alloc.save(path)
    back = Allocation.load(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.bits_by_layer() == alloc.bits_by_layer()
    assert back.budgets[0].budget == alloc.budgets[0].budget
    with pytest.raises(SpecError):
        Allocation.from_dict({"kind": "something else"})


def _cli(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mpq")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["allocate", *argv])
    assert args.func is run
    return int(args.func(args))


def test_cli_allocate_writes_out_and_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sens = tmp_path / "sens.json"
    _table().save(sens)
    out = tmp_path / "alloc.json"
    rc = _cli(
        tmp_path,
        str(sens),
        "--budget",
        "avg-bits=3",
        "--pin",
        r"classifier\.weight=8",
        "--bits",
        "2,3,4,8",
        "--out",
        str(out),
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "classifier.weight" in text and "avg-bits=3 bits" in text
    alloc = Allocation.load(out)
    assert alloc.bits_by_layer()["classifier.weight"] == 8


def test_cli_json_output_is_clean_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sens = tmp_path / "sens.json"
    _table(n=12).save(sens)
    out = tmp_path / "alloc.json"
    _cli(
        tmp_path,
        str(sens),
        "--budget",
        "size=30KB",
        "--solver",
        "exact",
        "--out",
        str(out),
        "--json",
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())


def test_cli_table_budget_reads_cost_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table()
    sens = tmp_path / "sens.json"
    table.save(sens)
    cost = tmp_path / "lat.json"
    cost.write_text(
        json.dumps(
            {"schema_version": 1, "layers": {n: {str(b): b for b in BITS} for n in table.names}}
        )
    )
    out = tmp_path / "alloc.json"
    _cli(tmp_path, str(sens), "--budget", "table=20", "--cost-table", str(cost), "--out", str(out))
    assert sum(Allocation.load(out).bits_by_layer().values()) <= 20


def test_fewer_bits_never_predict_less_harm_than_more() -> None:
    # Layer "b" scores lower at 2 bits than at 3 (sample noise); taking 2 bits on that evidence
    # would trust the noise. The envelope raises its 2-bit entry to the 3-bit one.
    omega = np.array([[4.0, 2.0, 1.0], [1.0, 3.0, 0.5]])
    envelope, raised = monotone_envelope(omega, ["a", "b"], [2, 3, 4])
    assert envelope.tolist() == [[4.0, 2.0, 1.0], [3.0, 3.0, 0.5]]
    assert raised == {"b": [2]}
    layers = [LayerInfo(n, "linear", (10, 10), 100, 10, 100) for n in ("a", "b")]
    table = SensitivityTable(layers=layers, bits=[2, 3, 4], omega=omega.tolist(), method="fisher")
    alloc = allocate_bits(table, [Budget("avg-bits", 3.0)])
    assert alloc.raised == {"b": [2]}
    assert alloc.layers[1].omega[2] == 3.0
    assert Allocation.from_dict(alloc.to_dict()).raised == {"b": [2]}
