"""JobSpec: JSON round trip, validation with SpecError, inline cost tables, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from mpq_core.errors import BudgetError, SpecError
from mpq_core.spec import SCHEMA_VERSION, JobSpec


def _full_spec() -> JobSpec:
    """A spec with every field away from its default."""
    return JobSpec(
        budgets=["avg-bits=3.5", "size=2KB", "table=12"],
        bits=[8, 2, 4, 4, 3],
        method="fisher",
        pins={r"fc\..*": 8, "conv1.weight": 4},
        ties=[r"conv[23]\.weight"],
        solver="exact",
        act_bits=6,
        quantize_activations=True,
        cost_table={"fc.weight": {"2": 1.0, "4": 2.5, "8": 4.0}, "conv1.weight": {"2": 0.5}},
        loss="ce",
        first_order=True,
        hawq_iterations=17,
        batch_size=9,
        finetune_epochs=2,
        finetune_steps=11,
        finetune_lr=3e-3,
        finetune_batch_size=5,
        val_fraction=0.25,
        patience=4,
        eval_fraction=0.3,
        output_key="logits",
        seed=123,
    )


def test_bits_are_normalised_to_sorted_distinct() -> None:
    assert _full_spec().bits == [2, 3, 4, 8]


def test_to_dict_from_dict_round_trip_through_json() -> None:
    spec = _full_spec()
    doc = spec.to_dict()
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["kind"] == "mpq.job_spec"
    again = JobSpec.from_dict(json.loads(json.dumps(doc)))
    assert again == spec
    assert again.to_dict() == doc


def test_default_spec_round_trip() -> None:
    spec = JobSpec(budgets=["compression=8x"])
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.finetunes  # finetune_epochs defaults to 5


def test_finetunes_follows_steps_over_epochs() -> None:
    assert not JobSpec(budgets=["avg-bits=4"], finetune_epochs=0).finetunes
    assert not JobSpec(budgets=["avg-bits=4"], finetune_epochs=3, finetune_steps=0).finetunes
    assert JobSpec(budgets=["avg-bits=4"], finetune_epochs=0, finetune_steps=2).finetunes


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        pytest.param({"budgets": []}, "at least one budget", id="no-budget"),
        pytest.param({"budgets": ["avg-bits=abc"]}, "avg-bits=abc", id="budget-not-a-number"),
        pytest.param({"budgets": ["speed=3"]}, "unknown kind", id="budget-unknown-kind"),
        pytest.param({"budgets": ["avg-bits"]}, "KIND=VALUE", id="budget-no-value"),
        pytest.param({"budgets": ["size=-3MB"]}, "positive", id="budget-negative"),
        pytest.param({"budgets": ["table=3"]}, "table", id="table-budget-without-table"),
        pytest.param({"bits": [1, 4]}, "2..8", id="bits-below-2"),
        pytest.param({"bits": [4, 9]}, "2..8", id="bits-above-8"),
        pytest.param({"bits": []}, "2..8", id="bits-empty"),
        pytest.param({"method": "magic"}, "method", id="unknown-method"),
        pytest.param({"solver": "ilp"}, "solver", id="unknown-solver"),
        pytest.param({"loss": "hinge"}, "loss", id="unknown-loss"),
        pytest.param({"bits": [2, 4, 8], "pins": {"fc.*": 3}}, "not among", id="pin-not-in-bits"),
        pytest.param({"pins": {"fc(": 4}}, "not a valid regex", id="bad-pin-regex"),
        pytest.param({"ties": ["conv[12"]}, "not a valid regex", id="bad-tie-regex"),
        pytest.param({"method": "kl", "first_order": True}, "first_order", id="first-order-kl"),
        pytest.param({"method": "hawq", "first_order": True}, "first_order", id="first-order-hawq"),
        pytest.param({"finetune_epochs": -1}, "negative", id="negative-epochs"),
        pytest.param({"finetune_steps": -5}, "negative", id="negative-steps"),
        pytest.param({"act_bits": 1}, "act_bits", id="act-bits-1"),
        pytest.param({"val_fraction": 0.95}, "val_fraction", id="val-fraction"),
        pytest.param({"batch_size": 0}, "batch_size", id="batch-size-0"),
        pytest.param({"finetune_lr": 0.0}, "finetune_lr", id="lr-0"),
    ],
)
def test_invalid_specs_raise_spec_error(overrides: dict[str, Any], fragment: str) -> None:
    kwargs: dict[str, Any] = {"budgets": ["avg-bits=4"], **overrides}
    with pytest.raises(SpecError) as info:
        JobSpec(**kwargs)
    assert fragment in info.value.message
    assert isinstance(info.value.to_dict()["code"], str)


def test_bad_budget_text_has_budget_code() -> None:
    with pytest.raises(BudgetError) as info:
        JobSpec(budgets=["avg-bits=three"])
    assert info.value.code == "invalid_budget"
    assert isinstance(info.value, SpecError)


def test_from_dict_refuses_unknown_fields() -> None:
    doc = JobSpec(budgets=["avg-bits=4"]).to_dict()
    doc["finetune_epoch"] = 3  # typo of finetune_epochs
    doc["colour"] = "red"
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(doc)
    assert "colour" in info.value.message and "finetune_epoch" in info.value.message


def test_from_dict_refuses_newer_schema_and_missing_budgets() -> None:
    doc = JobSpec(budgets=["avg-bits=4"]).to_dict()
    with pytest.raises(SpecError, match="newer"):
        JobSpec.from_dict({**doc, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(SpecError):
        JobSpec.from_dict({"bits": [2, 4]})  # no budgets at all


def test_from_dict_validates_like_the_constructor() -> None:
    doc = JobSpec(budgets=["avg-bits=4"]).to_dict()
    with pytest.raises(SpecError):
        JobSpec.from_dict({**doc, "bits": [0, 4]})
    with pytest.raises(SpecError):
        JobSpec.from_dict({**doc, "budgets": ["avg-bits=nope"]})


def test_table_budget_with_inline_cost_table_parses() -> None:
    table = {"fc.weight": {"2": 1.0, "4": 2.5, "8": 4.0}, "conv1.weight": {"4": 0.25}}
    spec = JobSpec(budgets=["table=3.5", "avg-bits=4"], cost_table=table)
    parsed = spec.parsed_budgets()
    assert [b.kind for b in parsed] == ["table", "avg-bits"]
    assert parsed[0].value == 3.5
    assert parsed[0].table == {"fc.weight": {2: 1.0, 4: 2.5, 8: 4.0}, "conv1.weight": {4: 0.25}}
    # The inline table survives the JSON round trip and still parses.
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.parsed_budgets()[0].table == parsed[0].table


def test_malformed_inline_cost_table_is_refused() -> None:
    with pytest.raises(SpecError):
        JobSpec(budgets=["table=3"], cost_table={"fc.weight": {"four": 1.0}})
    with pytest.raises(SpecError):
        JobSpec(budgets=["table=3"], cost_table={"fc.weight": [1.0, 2.0]})  # type: ignore[dict-item]


def test_spec_module_does_not_import_torch() -> None:
    code = (
        "import sys, mpq_core.spec as s; "
        "s.JobSpec(budgets=['avg-bits=3']).to_dict(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "mpq_core.spec imported torch"
