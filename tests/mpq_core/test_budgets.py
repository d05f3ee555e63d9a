from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpq_core.budgets import (
    Budget,
    achieved,
    budget_constraint,
    format_value,
    load_cost_table,
    parse_budget,
)
from mpq_core.errors import BudgetError
from mpq_core.layers import LayerInfo


def _layers() -> list[LayerInfo]:
    return [
        LayerInfo("conv.weight", "conv2d", (8, 3, 3, 3), 216, 8, 216 * 100),
        LayerInfo("fc.weight", "linear", (10, 80), 800, 10, 800),
    ]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("avg-bits=3", "avg-bits", 3.0),
        ("avg_bits=3.5", "avg-bits", 3.5),
        ("size=1.5MB", "size", 1.5e6),
        ("size=2KiB", "size", 2048.0),
        ("size=1 GiB", "size", 2.0**30),
        ("size=1000", "size", 1000.0),
        ("size=12B", "size", 12.0),
        ("compression=8", "compression", 8.0),
        ("compression=8x", "compression", 8.0),
        ("bitops=1.2e9", "bitops", 1.2e9),
        ("bitops=1.2G", "bitops", 1.2e9),
        ("bitops=3T", "bitops", 3e12),
        ("bitops=500K", "bitops", 5e5),
    ],
)
def test_parse_budget_accepts_documented_forms(text: str, kind: str, value: float) -> None:
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    ["avg-bits", "avg-bits=", "speed=3", "size=1.5XB", "size=-1MB", "compression=0", "bitops=x"],
)
def test_parse_budget_rejects_bad_text_and_lists_accepted_forms(text: str) -> None:
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert "accepted forms" in err.value.message
    assert "size=1.5MB" in err.value.message


def test_parse_budget_bitops_keeps_activation_bits() -> None:
    assert parse_budget("bitops=1G", act_bits=4).act_bits == 4


def test_table_budget_needs_cost_table_and_loads_it(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="cost-table"):
        parse_budget("table=3")
    path = tmp_path / "lat.json"
    path.write_text(
        json.dumps({"schema_version": 1, "layers": {"fc.weight": {"2": 0.5, "4": 1.0}}})
    )
    b = parse_budget("table=3", table_path=str(path))
    assert b.table == {"fc.weight": {2: 0.5, 4: 1.0}}
    assert load_cost_table(path) == b.table


def test_load_cost_table_rejects_newer_schema_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema_version": 2, "layers": {}}))
    with pytest.raises(BudgetError, match="schema_version"):
        load_cost_table(path)
    path.write_text(json.dumps({"schema_version": 1, "layers": {"a": {"x": 1}}}))
    with pytest.raises(BudgetError):
        load_cost_table(path)
    path.write_text("{not json")
    with pytest.raises(BudgetError):
        load_cost_table(path)


@pytest.mark.parametrize(
    "budget",
    [
        Budget("avg-bits", 3.0),
        Budget("size", 1.5e6),
        Budget("bitops", 2e9, act_bits=4),
        Budget("table", 2.5, table={"fc.weight": {2: 1.0, 4: 2.0}}),
    ],
)
def test_budget_json_round_trip(budget: Budget) -> None:
    assert Budget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget


def test_avg_bits_constraint_is_parameter_weighted_mean() -> None:
    layers = _layers()
    costs, cap = budget_constraint(Budget("avg-bits", 3.0), layers, [2, 4, 8])
    assert cap == pytest.approx(3.0 * 1016)
    assert costs[1].tolist() == [1600.0, 3200.0, 6400.0]
    assert achieved(Budget("avg-bits", 3.0), layers, 0, [8, 2]) == pytest.approx(
        (216 * 8 + 800 * 2) / 1016
    )


def test_size_constraint_counts_scales_and_float_params() -> None:
    layers = _layers()
    budget = Budget("size", 2000.0)
    costs, cap = budget_constraint(budget, layers, [4], float_params=18)
    assert costs[0, 0] == pytest.approx((216 * 4 + 8 * 16) / 8)
    assert cap == pytest.approx(2000.0 - 4 * 18)
    size = achieved(budget, layers, 18, [4, 4])
    assert size == pytest.approx(costs.sum() + 4 * 18)


def test_compression_constraint_matches_achieved_ratio() -> None:
    layers = _layers()
    budget = Budget("compression", 6.0)
    costs, cap = budget_constraint(budget, layers, [2, 4], float_params=18)
    fp32 = 4.0 * (1016 + 18)
    assert cap == pytest.approx(fp32 / 6.0 - 4 * 18)
    # choice meeting the constraint exactly reaches the ratio
    ratio = achieved(budget, layers, 18, [4, 4])
    assert ratio == pytest.approx(fp32 / (costs[:, 1].sum() + 4 * 18))


def test_bitops_constraint_uses_macs_and_activation_bits() -> None:
    layers = _layers()
    budget = Budget("bitops", 1e6, act_bits=4)
    costs, cap = budget_constraint(budget, layers, [2, 8])
    assert costs[0].tolist() == [21600 * 2 * 4, 21600 * 8 * 4]
    assert cap == 1e6
    assert achieved(budget, layers, 0, [2, 8]) == 21600 * 2 * 4 + 800 * 8 * 4


def test_table_constraint_names_missing_layer_and_bits() -> None:
    layers = _layers()
    table = {"conv.weight": {2: 1.0, 4: 2.0}}
    with pytest.raises(BudgetError, match=r"fc\.weight"):
        budget_constraint(Budget("table", 3.0, table=table), layers, [2, 4])
    table["fc.weight"] = {2: 1.0}
    with pytest.raises(BudgetError, match=r"fc\.weight.*4 bits"):
        budget_constraint(Budget("table", 3.0, table=table), layers, [2, 4])
    table["fc.weight"][4] = 3.0
    costs, cap = budget_constraint(Budget("table", 3.0, table=table), layers, [2, 4])
    assert costs.tolist() == [[1.0, 2.0], [1.0, 3.0]]
    assert cap == 3.0


def test_format_value_uses_units() -> None:
    assert format_value("size", 14_200) == "14.2 KB"
    assert format_value("compression", 7.6) == "7.6x"
    assert format_value("avg-bits", 3.25) == "3.25 bits"


def test_compression_is_against_the_models_own_size() -> None:
    # A bfloat16 model of 1,000 parameters is 2,000 bytes, not 4,000: 8 bits everywhere is a
    # compression of about 2x, not 4x.
    fc = LayerInfo("fc.weight", "linear", (10, 100), 1000, 10, 1000)
    packed = (1000 * 8 + 10 * 16) / 8
    assert achieved(Budget("compression", 2), [fc], 0, [8]) == pytest.approx(4000 / packed)
    assert achieved(Budget("compression", 2), [fc], 0, [8], model_bytes=2000) == pytest.approx(
        2000 / packed
    )
    costs, capacity = budget_constraint(Budget("compression", 2), [fc], [8], model_bytes=2000)
    assert capacity == pytest.approx(1000.0) and costs[0, 0] == pytest.approx(packed)
