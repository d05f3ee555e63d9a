from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_core.errors import BudgetInfeasible
from mpq_core.solvers import (
    CAPACITY_RTOL,
    Problem,
    hull_greedy,
    solve,
    solve_exact,
    solve_greedy,
)
from mpq_core.solvers.hull import hull_upgrades

BITS = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
FAST = settings(max_examples=25, deadline=None)


def _within_budgets(problem: Problem, choice: np.ndarray) -> bool:
    totals = problem.totals(choice)
    slack = CAPACITY_RTOL * np.maximum(1.0, np.abs(problem.capacities))
    return bool(np.all(totals <= problem.capacities + slack))


def _instance(
    seed: int, n: int, level: float, *, unequal: bool = False, monotone: bool = True
) -> Problem:
    rng = np.random.default_rng(seed)
    params = np.round(rng.lognormal(8.0, 1.5, n)) + 16
    if unequal:
        params[rng.integers(n)] = params.sum() * rng.uniform(3, 30)
    scale = rng.lognormal(0.0, 1.5, n) * np.sqrt(params)
    if monotone:
        values = scale[:, None] * 4.0 ** (-BITS) * rng.lognormal(0, 0.3, (n, BITS.size))
    else:
        values = scale[:, None] * rng.uniform(0, 1, (n, BITS.size))
    costs = params[:, None] * BITS
    return Problem.build(values, [(costs, level * params.sum())])


def _two_budget_instance(seed: int, n: int, a: float, b: float) -> Problem:
    rng = np.random.default_rng(seed)
    params = np.round(rng.lognormal(8.0, 1.5, n)) + 16
    macs = params * rng.lognormal(3.0, 1.0, n)
    values = rng.lognormal(0, 1.5, n)[:, None] * 4.0 ** (-BITS)
    size = params[:, None] * BITS
    ops = macs[:, None] * BITS * 8
    return Problem.build(values, [(size, a * params.sum()), (ops, b * 8 * macs.sum())])


def _unequal_fixed() -> Problem:
    # One big layer and three small ones; the small ones' upgrades are the most efficient, and
    # once taken the big layer's upgrade no longer fits: the hull greedy stays ~5x above optimum.
    values = [[100.0, 1.0, 0.0]] + [[10.0, 0.1, 0.0]] * 3
    params = np.array([1_000_000.0, 100.0, 100.0, 100.0])
    costs = params[:, None] * np.array([2.0, 4.0, 8.0])
    return Problem.build(values, [(costs, 3.9997 * params.sum())])


@FAST
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 12),
    level=st.floats(2.0, 8.0),
    unequal=st.booleans(),
    monotone=st.booleans(),
)
def test_every_solver_stays_within_the_budget(
    seed: int, n: int, level: float, unequal: bool, monotone: bool
) -> None:
    problem = _instance(seed, n, level, unequal=unequal, monotone=monotone)
    for sol in (hull_greedy(problem), solve_greedy(problem), solve_exact(problem)):
        assert _within_budgets(problem, sol.choice), sol.method
        assert sol.objective == pytest.approx(problem.objective(sol.choice))


@FAST
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 12),
    level=st.floats(2.0, 8.0),
    unequal=st.booleans(),
    monotone=st.booleans(),
)
def test_greedy_within_half_percent_of_exact_on_small_instances(
    seed: int, n: int, level: float, unequal: bool, monotone: bool
) -> None:
    problem = _instance(seed, n, level, unequal=unequal, monotone=monotone)
    exact = solve_exact(problem)
    greedy = solve_greedy(problem)
    assert greedy.objective <= exact.objective * 1.005 + 1e-12


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), level=st.floats(2.2, 6.0))
def test_greedy_within_half_percent_of_exact_at_50_items(seed: int, level: float) -> None:
    problem = _instance(seed, 50, level)
    assert solve_greedy(problem).objective <= solve_exact(problem).objective * 1.005


@FAST
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 10),
    lo=st.floats(2.0, 7.0),
    step=st.floats(0.01, 2.0),
    monotone=st.booleans(),
)
def test_objective_never_rises_as_the_budget_grows(
    seed: int, n: int, lo: float, step: float, monotone: bool
) -> None:
    small = _instance(seed, n, lo, monotone=monotone)
    big = Problem.build(small.values, [(small.costs[0], small.capacities[0] * (lo + step) / lo)])
    e_small, e_big = solve_exact(small), solve_exact(big)
    assert e_big.objective <= e_small.objective * (1 + 1e-6) + 1e-12
    # The greedy is not provably monotone; what holds is that it is within 0.5% of the exact
    # optimum at both sizes, hence never more than 0.5% above its own smaller-budget result.
    assert solve_greedy(big).objective <= solve_greedy(small).objective * 1.005 + 1e-12


def test_unequal_layers_hull_greedy_is_far_but_refined_greedy_is_optimal() -> None:
    problem = _unequal_fixed()
    exact = solve_exact(problem)
    assert exact.objective == pytest.approx(21.1)
    assert hull_greedy(problem).objective > 4 * exact.objective
    greedy = solve_greedy(problem)
    assert greedy.objective == pytest.approx(exact.objective)
    assert _within_budgets(problem, greedy.choice)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(3, 6), level=st.floats(2.0, 7.0))
def test_small_unequal_nets_within_half_percent(seed: int, n: int, level: float) -> None:
    problem = _instance(seed, n, level, unequal=True)
    assert solve_greedy(problem).objective <= solve_exact(problem).objective * 1.005 + 1e-12


@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(1, 12), level=st.floats(2.0, 8.0))
def test_lp_bound_is_a_lower_bound(seed: int, n: int, level: float) -> None:
    problem = _instance(seed, n, level)
    sol = hull_greedy(problem)
    assert sol.lower_bound is not None
    assert sol.lower_bound <= solve_exact(problem).objective * (1 + 1e-9) + 1e-12


@FAST
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 10),
    a=st.floats(2.0, 8.0),
    b=st.floats(2.0, 8.0),
)
def test_several_budgets_are_never_exceeded(seed: int, n: int, a: float, b: float) -> None:
    problem = _two_budget_instance(seed, n, a, b)
    try:
        exact = solve_exact(problem)
    except BudgetInfeasible:
        with pytest.raises(BudgetInfeasible):
            solve(problem, "auto")
        return
    for sol in (hull_greedy(problem), solve_greedy(problem), solve(problem, "auto")):
        assert _within_budgets(problem, sol.choice), sol.method
    assert solve(problem, "auto").objective <= exact.objective * (1 + 1e-6) + 1e-12


@FAST
@given(seed=st.integers(0, 10**6), n=st.integers(2, 10), level=st.floats(2.0, 8.0))
def test_allowed_mask_is_honoured(seed: int, n: int, level: float) -> None:
    base = _instance(seed, n, level)
    rng = np.random.default_rng(seed)
    allowed = rng.random(base.values.shape) < 0.5
    allowed[np.arange(n), rng.integers(0, BITS.size, n)] = True
    low = np.where(allowed, base.costs[0], np.inf).min(axis=1).sum()
    cap = max(float(base.capacities[0]), float(low))
    problem = Problem.build(base.values, [(base.costs[0], cap)], allowed)
    for sol in (hull_greedy(problem), solve_greedy(problem), solve_exact(problem)):
        assert allowed[np.arange(n), sol.choice].all(), sol.method
        assert _within_budgets(problem, sol.choice)


def test_infeasible_budget_raises() -> None:
    problem = Problem.build([[1.0, 0.0]], [([[10.0, 20.0]], 5.0)])
    for fn in (hull_greedy, solve_greedy, solve_exact):
        with pytest.raises(BudgetInfeasible, match="smallest achievable total is 10"):
            fn(problem)


def test_budgets_infeasible_only_together_raise() -> None:
    # Item alone: choice 0 meets budget A only, choice 1 meets budget B only.
    problem = Problem.build([[1.0, 0.0]], [([[1.0, 3.0]], 2.0), ([[3.0, 1.0]], 2.0)])
    with pytest.raises(BudgetInfeasible, match="together"):
        solve(problem, "auto")


def test_exact_fit_is_feasible() -> None:
    # avg-bits=4 with every layer at 4 bits must be allowed despite float sums.
    params = np.array([1234.0, 77.0, 99_999.0])
    costs = params[:, None] * np.array([2.0, 4.0, 8.0])
    values = np.array([[10.0, 1.0, 0.9]] * 3)
    problem = Problem.build(values, [(costs, 4.0 * params.sum())])
    assert problem.is_feasible(np.array([1, 1, 1]))
    for fn in (solve_greedy, solve_exact):
        assert fn(problem).choice.tolist() == [1, 1, 1]


def test_hull_upgrades_are_sorted_and_follow_each_chain() -> None:
    problem = _instance(7, 30, 4.0, monotone=False)
    up = hull_upgrades(problem.values, problem.costs[0], problem.allowed, problem.costs)
    assert np.all(np.diff(up.efficiency) <= 1e-12)
    seen: dict[int, int] = {}
    for i, t in zip(up.item.tolist(), up.step.tolist(), strict=True):
        assert seen.get(i, 0) == t
        seen[i] = t + 1
    assert np.all(up.gain < 0) and np.all(up.cost[0] > 0)


def test_solve_rejects_unknown_method() -> None:
    from mpq_core.errors import SpecError

    with pytest.raises(SpecError):
        solve(_unequal_fixed(), "magic")
