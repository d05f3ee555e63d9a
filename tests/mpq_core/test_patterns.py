"""Pins and ties are matched by RE2: bounded time on hostile patterns, clear refusals."""

from __future__ import annotations

import pytest

from mpq_core.allocation import allocate_bits
from mpq_core.budgets import Budget
from mpq_core.errors import SpecError
from mpq_core.patterns import MAX_PATTERN_CHARS, compile_pattern
from mpq_core.spec import JobSpec
from tests.mpq_core.test_allocation import _table


def test_catastrophic_pattern_matches_a_long_name_without_backtracking() -> None:
    # Python's re needs about 2**n steps for this pattern on n 'a's followed by a 'b'; with
    # n = 100_000 it would never return, so this test only finishes with a linear-time engine.
    name = "a" * 100_000 + "b"
    pattern = compile_pattern("(a+)+$", "pin")
    assert not pattern.fullmatch(name)
    assert pattern.fullmatch("a" * 100_000)


def test_nested_quantifiers_over_a_real_layer_list_are_bounded() -> None:
    names = [f"{'block.' * 2000}{i}.weight" for i in range(50)]
    want = [i for i, name in enumerate(names) if name.endswith(("0.weight", "1.weight"))]
    assert compile_pattern("(block\\.|b.*)+(0|1)\\.weight", "tie").matching(names) == want


@pytest.mark.parametrize(
    ("pattern", "code"),
    [
        pytest.param("x" * (MAX_PATTERN_CHARS + 1), "regex_too_long", id="too-long"),
        pytest.param("(a)\\1", "invalid_regex", id="backreference"),
        pytest.param("(?=fc)fc", "invalid_regex", id="lookahead"),
        pytest.param("a{1000}{1000}", "invalid_regex", id="repetition-bomb"),
        pytest.param("((a{100}){100}){100}", "invalid_regex", id="nested-counts"),
        pytest.param("fc(", "invalid_regex", id="syntax"),
        pytest.param(7, "spec_type", id="not-a-string"),
    ],
)
def test_refused_patterns_have_their_code(pattern: object, code: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_pattern(pattern, "pin")
    assert info.value.code == code


def test_spec_refuses_a_pattern_the_engine_cannot_bound() -> None:
    with pytest.raises(SpecError) as info:
        JobSpec(budgets=["avg-bits=4"], pins={"(a)\\1": 8})
    assert info.value.code == "invalid_regex"
    with pytest.raises(SpecError) as info:
        JobSpec(budgets=["avg-bits=4"], ties=["t" * 500])
    assert info.value.code == "regex_too_long"


def test_allocation_pins_and_ties_match_whole_names_with_re2() -> None:
    table = _table()
    alloc = allocate_bits(
        table,
        [Budget("avg-bits", 8.0)],
        pins={"features\\.[0-2]\\.weight": 2},
        ties=["features\\.[34]\\.weight"],
    )
    chosen = alloc.bits_by_layer()
    assert [chosen[f"features.{i}.weight"] for i in range(3)] == [2, 2, 2]
    assert chosen["features.3.weight"] == chosen["features.4.weight"]
    # a full match: "features.1" alone names no layer
    with pytest.raises(SpecError, match="matches no layer"):
        allocate_bits(table, [Budget("avg-bits", 8.0)], pins={"features\\.1": 2})
