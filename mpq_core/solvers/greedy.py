"""The hull greedy of Chen et al. (ICCV 2021) for MCKP, and the refined solver built on it.

``hull_greedy``: start every item at its cheapest choice and take hull upgrades in order of value
saved per unit cost while they fit (an upgrade that does not fit blocks the rest of its item's
chain; the others go on). One budget ranks upgrades by its own cost; several budgets by a
weighted sum of costs, each normalised by the room it leaves, while every budget is checked.

``solve_greedy``: the hull greedy, then local search (:mod:`mpq_core.solvers.local_search`)
and, for a single budget, a bounded exact search on small instances (:mod:`.pareto`). The plain
hull greedy can land far from the optimum when a few items are very unequal (one big layer
whose upgrade stops fitting after the small ones took the room); the refinements close that.
"""

from __future__ import annotations

import time

import numpy as np
from numpy.typing import NDArray

from mpq_core.solvers.hull import Upgrades, hull_upgrades
from mpq_core.solvers.local_search import improve, repair
from mpq_core.solvers.pareto import pareto_search
from mpq_core.solvers.problem import CAPACITY_RTOL, Problem, Solution

__all__ = ["PARETO_MAX_ITEMS", "hull_greedy", "rank_costs", "solve_greedy"]

# Single-budget instances up to this many items also get the bounded exact search.
PARETO_MAX_ITEMS = 64
# Items whose largest upgrade takes at least this share of the budget's room get restarts.
_BIG_ITEM_SHARE = 0.01
_MAX_BIG_ITEMS = 12
# Restarts are skipped once the LP bound proves the choice this close to the optimum.
_RESTART_GAP = 1e-4


def rank_costs(problem: Problem) -> NDArray[np.float64]:
    """The single cost the hull is taken over: the budget's own, or a normalised sum of several."""
    if problem.n_constraints == 1:
        return problem.costs[0]
    total = np.zeros(problem.values.shape)
    for k in range(problem.n_constraints):
        low = float(problem.totals(problem.cheapest(k))[k])
        room = max(float(problem.capacities[k]) - low, 0.0)
        scale = np.abs(problem.costs[k]).max()
        total += problem.costs[k] / max(room, 1e-12 * max(float(scale), 1.0), 1e-300)
    return total


def _tolerance(problem: Problem) -> NDArray[np.float64]:
    return CAPACITY_RTOL * np.maximum(1.0, np.abs(problem.capacities))


def _take(
    up: Upgrades,
    slack: NDArray[np.float64],
    tol: NDArray[np.float64],
    keep: NDArray[np.bool_] | None = None,
) -> NDArray[np.intp]:
    """Take upgrades in order while they fit; returns the chain level reached by each item."""
    level = np.zeros(up.base.size, dtype=np.intp)
    item, step, cost = up.item, up.step, up.cost
    if keep is not None:
        item, step, cost = item[keep], step[keep], cost[:, keep]
    s = item.size
    if s == 0:
        return level
    cum = np.cumsum(cost, axis=1)
    over = (cum > (slack + tol)[:, None]).any(axis=0)
    first = int(over.argmax()) if over.any() else s
    if first > 0:
        # A prefix of the sorted list holds a prefix of every item's chain.
        np.maximum.at(level, item[:first], step[:first] + 1)
    if first == s:
        return level
    left = slack - cum[:, first - 1] if first > 0 else slack.copy()
    rest = np.arange(first, s)
    if (cost[:, first:] >= 0).all():
        # Room only shrinks from here, so an upgrade larger than today's room never fits.
        rest = rest[(cost[:, rest] <= (left + tol)[:, None]).all(axis=0)]
    if cost.shape[0] == 1:
        room = float(left[0] + tol[0])
        c0 = cost[0]
        for i, t, dc in zip(
            item[rest].tolist(), step[rest].tolist(), c0[rest].tolist(), strict=True
        ):
            if level[i] == t and dc <= room:
                level[i] = t + 1
                room -= dc
        return level
    bound = left + tol
    for r in rest.tolist():
        i = int(item[r])
        if level[i] == step[r] and (cost[:, r] <= bound).all():
            level[i] += 1
            bound = bound - cost[:, r]
    return level


def _choice(up: Upgrades, level: NDArray[np.intp]) -> NDArray[np.intp]:
    return up.vertices[np.arange(level.size), level]


def _lp_bound(problem: Problem, up: Upgrades) -> float:
    """Optimum of the LP relaxation (one budget): the sorted upgrades, the last one in part."""
    base_value = problem.objective(up.base)
    slack = float(problem.capacities[0] - problem.totals(up.base)[0])
    cost = up.cost[0]
    cum = np.cumsum(cost)
    over = np.flatnonzero(cum > slack)
    if over.size == 0:
        return base_value + float(up.gain.sum())
    f = int(over[0])
    before = float(cum[f - 1]) if f > 0 else 0.0
    part = (slack - before) / float(cost[f])
    return base_value + float(up.gain[:f].sum()) + part * float(up.gain[f])


def _hull_greedy(problem: Problem) -> tuple[Solution, Upgrades]:
    t0 = time.perf_counter()
    problem.check_each_constraint()
    up = hull_upgrades(problem.values, rank_costs(problem), problem.allowed, problem.costs)
    slack = problem.capacities - problem.totals(up.base)
    tol = _tolerance(problem)
    method = "hull-greedy"
    if (slack + tol < 0).any():
        # Several budgets: the start cheapest in the combined cost can break one of them.
        fixed = repair(problem, up.base.copy())
        if fixed is None:
            from mpq_core.solvers.exact import solve_exact

            return solve_exact(problem), up
        choice, method = fixed, "hull-greedy+repair"
    else:
        choice = _choice(up, _take(up, slack, tol))
    bound = _lp_bound(problem, up) if problem.n_constraints == 1 else None
    sol = Solution(
        choice=choice,
        objective=problem.objective(choice),
        method=method,
        seconds=time.perf_counter() - t0,
        lower_bound=bound,
    )
    return sol, up


def hull_greedy(problem: Problem) -> Solution:
    """The paper's greedy alone: cheapest start, hull upgrades by efficiency while they fit.

    Args:
        problem: the instance; every budget must be satisfiable on its own.

    Example:
        >>> p = Problem.build([[4.0, 1.0], [2.0, 0.0]], [([[1, 2], [1, 2]], 3.0)])
        >>> hull_greedy(p).choice.tolist()
        [1, 0]
    """
    return _hull_greedy(problem)[0]


def _restarts(problem: Problem, up: Upgrades, best: NDArray[np.intp]) -> NDArray[np.intp]:
    """Re-run the greedy with each big item forced to each of its other choices."""
    rank = rank_costs(problem)
    rows = np.arange(problem.n_items)
    base_rank = rank[rows, up.base]
    step_size = np.where(problem.allowed, rank - base_rank[:, None], 0.0).max(axis=1)
    room = float(step_size.sum())
    if room <= 0:
        return best
    big = np.flatnonzero(step_size >= _BIG_ITEM_SHARE * room)
    big = big[np.argsort(-step_size[big])][:_MAX_BIG_ITEMS]
    tol = _tolerance(problem)
    slack0 = problem.capacities - problem.totals(up.base)
    best_value = problem.objective(best)
    for i in big.tolist():
        keep = up.item != i
        for j in np.flatnonzero(problem.allowed[i]).tolist():
            if j == best[i]:
                continue
            slack = slack0 - (problem.costs[:, i, j] - problem.costs[:, i, up.base[i]])
            if (slack + tol < 0).any():
                continue
            choice = _choice(up, _take(up, slack, tol, keep))
            choice[i] = j
            choice = improve(problem, choice, pairs=False)
            value = problem.objective(choice)
            if value < best_value and problem.is_feasible(choice):
                best, best_value = choice, value
    return best


def solve_greedy(problem: Problem, *, pareto_max_items: int = PARETO_MAX_ITEMS) -> Solution:
    """The refined greedy: hull greedy, restarts on big items, local search, small exact search.

    Never exceeds any budget. For a single budget it also reports the LP lower bound, so
    ``Solution.gap_bound`` is a proven distance to the optimum.

    Args:
        problem: the instance.
        pareto_max_items: single-budget instances with at most this many items are finished
            with the bounded exact search (0 turns it off).

    Example:
        >>> p = Problem.build([[9.0, 0.0], [1.0, 0.5], [1.0, 0.5]],
        ...                   [([[1, 9], [1, 2], [1, 2]], 11.0)])
        >>> solve_greedy(p).choice.tolist()
        [1, 0, 0]
    """
    t0 = time.perf_counter()
    start, up = _hull_greedy(problem)
    if not start.method.startswith("hull-greedy"):
        return start
    choice = improve(problem, start.choice.copy())
    bound = start.lower_bound
    value = problem.objective(choice)
    if bound is None or value - bound > _RESTART_GAP * abs(value):
        choice = improve(problem, _restarts(problem, up, choice))
        value = problem.objective(choice)
    method = "greedy"
    if problem.n_constraints == 1 and 0 < problem.n_items <= pareto_max_items:
        found, proven = pareto_search(problem, up, incumbent=value)
        if found is not None and problem.objective(found) < value:
            choice, value = found, problem.objective(found)
        if proven:
            bound = value
            method = "greedy+exact"
    return Solution(
        choice=choice,
        objective=value,
        method=method,
        seconds=time.perf_counter() - t0,
        lower_bound=bound,
    )
