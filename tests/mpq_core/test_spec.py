"""JobSpec: JSON round trip, validation with SpecError, inline cost tables, no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from typing import Any

import pytest

from mpq_core.errors import BudgetError, SpecError
from mpq_core.spec import (
    SCHEMA_VERSION,
    V1_FIELDS,
    AnalysisSpec,
    FinetuneSpec,
    JobSpec,
    Loss,
    Method,
    Solver,
)


def _full_spec() -> JobSpec:
    """A spec with every field away from its default."""
    return JobSpec(
        budgets=["avg-bits=3.5", "size=2KB", "table=12"],
        bits=[8, 2, 4, 4, 3],
        pins={r"fc\..*": 8, "conv1.weight": 4},
        ties=[r"conv[23]\.weight"],
        solver="exact",
        act_bits=6,
        quantize_activations=True,
        cost_table={"fc.weight": {"2": 1.0, "4": 2.5, "8": 4.0}, "conv1.weight": {"2": 0.5}},
        batch_size=9,
        eval_fraction=0.3,
        output_key="logits",
        seed=123,
        device="cpu",
        analysis=AnalysisSpec(
            method=Method.FISHER, loss=Loss.CE, first_order=True, hawq_iterations=17
        ),
        finetune=FinetuneSpec(
            epochs=2,
            steps=11,
            lr=3e-3,
            batch_size=5,
            val_fraction=0.25,
            patience=4,
            distill_weight=0.5,
            label_weight=2.0,
        ),
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
    assert spec.finetunes  # finetune.epochs defaults to 5


def test_finetunes_follows_steps_over_epochs() -> None:
    def spec(**finetune: Any) -> JobSpec:
        return JobSpec(budgets=["avg-bits=4"], finetune=FinetuneSpec(**finetune))

    assert not spec(epochs=0).finetunes
    assert not spec(epochs=3, steps=0).finetunes
    assert spec(epochs=0, steps=2).finetunes


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
        pytest.param({"analysis": {"method": "magic"}}, "method", id="unknown-method"),
        pytest.param({"solver": "ilp"}, "solver", id="unknown-solver"),
        pytest.param({"analysis": {"loss": "hinge"}}, "loss", id="unknown-loss"),
        pytest.param({"bits": [2, 4, 8], "pins": {"fc.*": 3}}, "not among", id="pin-not-in-bits"),
        pytest.param({"pins": {"fc(": 4}}, "not a valid regex", id="bad-pin-regex"),
        pytest.param({"ties": ["conv[12"]}, "not a valid regex", id="bad-tie-regex"),
        pytest.param(
            {"analysis": {"method": "kl", "first_order": True}}, "first_order", id="first-order-kl"
        ),
        pytest.param(
            {"analysis": {"method": "hawq", "first_order": True}},
            "first_order",
            id="first-order-hawq",
        ),
        pytest.param({"analysis": {"hawq_iterations": 0}}, "hawq_iterations", id="hawq-0"),
        pytest.param({"finetune": {"epochs": -1}}, "negative", id="negative-epochs"),
        pytest.param({"finetune": {"steps": -5}}, "negative", id="negative-steps"),
        pytest.param({"act_bits": 1}, "act_bits", id="act-bits-1"),
        pytest.param({"finetune": {"val_fraction": 0.95}}, "val_fraction", id="val-fraction"),
        pytest.param({"eval_fraction": 0.95}, "eval_fraction", id="eval-fraction"),
        pytest.param({"batch_size": 0}, "batch_size", id="batch-size-0"),
        pytest.param({"finetune": {"batch_size": 0}}, "finetune.batch_size", id="ft-batch-0"),
        pytest.param({"finetune": {"lr": 0.0}}, "finetune.lr", id="lr-0"),
        pytest.param({"finetune": {"label_weight": -1}}, "label_weight", id="label-weight"),
        pytest.param({"device": "tpu"}, "device", id="device"),
    ],
)
def test_invalid_specs_raise_spec_error(overrides: dict[str, Any], fragment: str) -> None:
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "budgets": ["avg-bits=4"], **overrides}
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(doc)
    assert fragment in info.value.message
    assert isinstance(info.value.to_dict()["code"], str)


def test_bad_budget_text_has_budget_code() -> None:
    with pytest.raises(BudgetError) as info:
        JobSpec(budgets=["avg-bits=three"])
    assert info.value.code == "invalid_budget"
    assert isinstance(info.value, SpecError)


def test_from_dict_refuses_unknown_fields() -> None:
    doc = JobSpec(budgets=["avg-bits=4"]).to_dict()
    doc["finetune"]["epoch"] = 3  # typo of epochs
    doc["colour"] = "red"
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(doc)
    assert "colour" in info.value.message and "finetune.epoch" in info.value.message
    with pytest.raises(SpecError, match="must be an object"):
        JobSpec.from_dict({**JobSpec(budgets=["avg-bits=4"]).to_dict(), "analysis": "fisher"})


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


# --- schema_version 1: flat documents stored in users' databases and sent by existing clients --

V1_DOC: dict[str, Any] = {
    "schema_version": 1,
    "kind": "mpq.job_spec",
    "budgets": ["avg-bits=3.5"],
    "bits": [2, 4, 8],
    "method": "hawq",
    "pins": {"fc.weight": 8},
    "ties": [],
    "solver": "greedy",
    "act_bits": 8,
    "quantize_activations": False,
    "cost_table": None,
    "loss": "mse",
    "first_order": False,
    "hawq_iterations": 17,
    "batch_size": 9,
    "finetune_epochs": 2,
    "finetune_steps": 11,
    "finetune_lr": 3e-3,
    "finetune_batch_size": 5,
    "val_fraction": 0.25,
    "patience": 4,
    "eval_fraction": 0.3,
    "output_key": None,
    "seed": 123,
    "device": "auto",
}


def test_schema_version_1_documents_are_read_into_the_nested_shape() -> None:
    spec = JobSpec.from_dict(V1_DOC)
    assert spec.analysis == AnalysisSpec(method=Method.HAWQ, loss=Loss.MSE, hawq_iterations=17)
    assert spec.finetune == FinetuneSpec(
        epochs=2, steps=11, lr=3e-3, batch_size=5, val_fraction=0.25, patience=4
    )
    assert (spec.solver, spec.batch_size, spec.seed, spec.bits) == (
        Solver.GREEDY,
        9,
        123,
        [2, 4, 8],
    )
    # Written back, it is a version 2 document that reads to the same spec.
    doc = spec.to_dict()
    assert doc["schema_version"] == 2
    assert doc["analysis"]["method"] == "hawq" and doc["finetune"]["lr"] == 3e-3
    assert not set(doc) & set(V1_FIELDS)
    assert JobSpec.from_dict(doc) == spec


def test_v1_mapping_covers_every_moved_field() -> None:
    for old, (part, name) in V1_FIELDS.items():
        assert name in {
            f.name for f in fields(AnalysisSpec if part == "analysis" else FinetuneSpec)
        }
        assert old not in {f.name for f in fields(JobSpec)}


def test_documents_without_schema_version_are_read_by_their_field_names() -> None:
    # What existing clients send: a few flat fields and no version.
    old = JobSpec.from_dict({"budgets": ["avg-bits=4"], "finetune_epochs": 0, "method": "kl"})
    assert old.finetune.epochs == 0 and old.analysis.method == "kl"
    new = JobSpec.from_dict({"budgets": ["avg-bits=4"], "finetune": {"epochs": 0}})
    assert new.finetune.epochs == 0
    assert JobSpec.from_dict({"budgets": ["avg-bits=4"]}) == JobSpec(budgets=["avg-bits=4"])


def test_v1_documents_are_validated_and_refuse_v2_sub_objects() -> None:
    with pytest.raises(SpecError, match=r"finetune\.lr"):
        JobSpec.from_dict({**V1_DOC, "finetune_lr": 0.0})
    with pytest.raises(SpecError, match="analysis"):
        JobSpec.from_dict({**V1_DOC, "analysis": {"method": "kl"}})
    with pytest.raises(SpecError, match="finetune_epoch"):
        JobSpec.from_dict({**V1_DOC, "finetune_epoch": 3})


def test_sensitivity_settings_hold_what_changes_the_table() -> None:
    spec = JobSpec(budgets=["avg-bits=4"])
    base = spec.sensitivity_settings(has_eval_data=False)
    json.dumps(base)  # a cache key: plain JSON
    assert base == JobSpec(budgets=["size=1MB"], act_bits=4).sensitivity_settings(
        has_eval_data=False
    )
    assert base == JobSpec(
        budgets=["avg-bits=4"], finetune=FinetuneSpec(epochs=0)
    ).sensitivity_settings(has_eval_data=False)
    changed = [
        JobSpec(budgets=["avg-bits=4"], analysis=AnalysisSpec(method=Method.KL)),
        JobSpec(budgets=["avg-bits=4"], analysis=AnalysisSpec(loss=Loss.CE)),
        JobSpec(budgets=["avg-bits=4"], bits=[2, 4, 8]),
        JobSpec(budgets=["avg-bits=4"], batch_size=8),
        JobSpec(budgets=["avg-bits=4"], seed=1),
        JobSpec(budgets=["avg-bits=4"], output_key="logits"),
        JobSpec(budgets=["avg-bits=4"], eval_fraction=0.1),
    ]
    for other in changed:
        assert other.sensitivity_settings(has_eval_data=False) != base, other
    assert spec.sensitivity_settings(has_eval_data=True) != base


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({"seed": float("nan")}, "spec_not_finite", id="seed-nan"),
        pytest.param({"batch_size": float("inf")}, "spec_not_finite", id="batch-inf"),
        pytest.param({"finetune": {"distill_weight": float("nan")}}, "spec_not_finite", id="w-nan"),
        pytest.param({"cost_table": {"fc": {"4": float("-inf")}}}, "spec_not_finite", id="table"),
        pytest.param({"schema_version": float("inf")}, "spec_not_finite", id="version-inf"),
        pytest.param({"seed": "7"}, "spec_type", id="seed-string"),
        pytest.param({"seed": 1.5}, "spec_type", id="seed-fraction"),
        pytest.param({"seed": True}, "spec_type", id="seed-bool"),
        pytest.param({"seed": 2**64}, "spec_out_of_range", id="seed-huge"),
        pytest.param({"bits": [2.5, 4]}, "spec_type", id="bits-fraction"),
        pytest.param({"bits": "248"}, "spec_type", id="bits-string"),
        pytest.param({"batch_size": 1.5}, "spec_type", id="batch-fraction"),
        pytest.param({"budgets": "avg-bits=4"}, "spec_type", id="budgets-string"),
        pytest.param({"budgets": [4]}, "spec_type", id="budgets-number"),
        pytest.param({"finetune": {"lr": 1e30}}, "spec_out_of_range", id="lr-huge"),
        pytest.param({"finetune": {"lr": -0.1}}, "spec_out_of_range", id="lr-negative"),
        pytest.param({"quantize_activations": "false"}, "spec_type", id="bool-string"),
        pytest.param({"device": "cuda:\u0663"}, "invalid_spec", id="device-arabic-digit"),
        pytest.param({"device": "cuda:" + "9" * 30}, "invalid_spec", id="device-huge-index"),
        pytest.param({"pins": {"fc\x00": 4}}, "spec_bad_text", id="nul-in-pin"),
        pytest.param({"output_key": "\ud800"}, "spec_bad_text", id="lone-surrogate"),
        pytest.param({"output_key": {"a": 1}}, "spec_type", id="output-key-object"),
        pytest.param({"ties": ["x"] * 1000}, "spec_too_large", id="many-ties"),
        pytest.param({"cost_table": [1, 2]}, "spec_type", id="cost-table-list"),
        pytest.param({"analysis": {"method": ["fisher"]}}, "spec_type", id="method-list"),
    ],
)
def test_hostile_values_raise_their_code(overrides: dict[str, Any], code: str) -> None:
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "budgets": ["avg-bits=4"], **overrides}
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(doc)
    assert info.value.code == code, info.value.message


def test_integral_floats_are_read_as_ints() -> None:
    spec = JobSpec.from_dict({"budgets": ["avg-bits=4"], "bits": [4.0, 8], "batch_size": 16.0})
    assert spec.bits == [4, 8] and spec.batch_size == 16 and isinstance(spec.batch_size, int)
