"""Local search on an MCKP choice: single moves into the leftover room, and upgrade/downgrade pairs.

Every move keeps all budgets met; each pass takes the best improving move over all items at once
(vectorised), so a pass costs a few array operations over the ``(n, m)`` table.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mpq_core.solvers.problem import CAPACITY_RTOL, Problem

__all__ = ["improve", "repair"]

_MAX_ROUNDS = 200


def _deltas(
    problem: Problem, choice: NDArray[np.intp]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Value change, cost changes and room left for every single move from ``choice``."""
    rows = np.arange(problem.n_items)
    d_val = problem.values - problem.values[rows, choice][:, None]
    d_cost = problem.costs - problem.costs[:, rows, choice][:, :, None]
    tol = CAPACITY_RTOL * np.maximum(1.0, np.abs(problem.capacities))
    room = problem.capacities + tol - problem.totals(choice)
    return d_val, d_cost, room


def _eps(problem: Problem) -> float:
    # A move must save more than float noise, or the search could cycle.
    return 1e-12 * max(float(np.abs(problem.values).max()), 1e-300)


def _best_single(problem: Problem, choice: NDArray[np.intp]) -> bool:
    d_val, d_cost, room = _deltas(problem, choice)
    ok = problem.allowed & (d_cost <= room[:, None, None]).all(axis=0)
    gain = np.where(ok, d_val, np.inf)
    flat = int(gain.argmin())
    if not gain.flat[flat] < -_eps(problem):
        return False
    i, j = divmod(flat, problem.n_choices)
    choice[i] = j
    return True


def _best_pair(problem: Problem, choice: NDArray[np.intp]) -> bool:
    """One budget: an upgrade that does not fit, paid for by the cheapest-in-loss downgrade."""
    d_val, d_cost3, room3 = _deltas(problem, choice)
    d_cost, room = d_cost3[0], float(room3[0])
    eps = _eps(problem)
    up = problem.allowed & (d_val < -eps) & (d_cost > room)
    down = problem.allowed & (d_cost < 0)
    if not up.any() or not down.any():
        return False
    di, dj = np.nonzero(down)
    freed = -d_cost[di, dj]
    penalty = d_val[di, dj]
    order = np.argsort(freed, kind="stable")
    freed, penalty, di, dj = freed[order], penalty[order], di[order], dj[order]
    # Cheapest penalty among downgrades freeing at least x: a suffix minimum over sorted freed.
    rev = penalty[::-1]
    run = np.minimum.accumulate(rev)
    at = np.arange(rev.size)
    last_new = np.where(rev == run, at, 0)
    arg_rev = np.maximum.accumulate(last_new)
    suf_min = run[::-1]
    suf_arg = (rev.size - 1 - arg_rev)[::-1]
    ui, uj = np.nonzero(up)
    need = d_cost[ui, uj] - room
    pos = np.searchsorted(freed, need, side="left")
    has = pos < freed.size
    ui, uj, pos = ui[has], uj[has], pos[has]
    if ui.size == 0:
        return False
    total = d_val[ui, uj] + suf_min[pos]
    partner = suf_arg[pos]
    total = np.where(di[partner] == ui, np.inf, total)
    b = int(total.argmin())
    if not total[b] < -eps:
        return False
    i, j = int(ui[b]), int(uj[b])
    k, m = int(di[partner[b]]), int(dj[partner[b]])
    trial = choice.copy()
    trial[i], trial[k] = j, m
    if not problem.is_feasible(trial):
        return False
    choice[:] = trial
    return True


def improve(problem: Problem, choice: NDArray[np.intp], *, pairs: bool = True) -> NDArray[np.intp]:
    """Apply the best improving move until none is left (``choice`` is updated and returned).

    Args:
        problem: the instance.
        choice: a feasible choice.
        pairs: also try upgrade/downgrade pairs (single budget only).
    """
    use_pairs = pairs and problem.n_constraints == 1
    for _ in range(_MAX_ROUNDS):
        if _best_single(problem, choice):
            continue
        if use_pairs and _best_pair(problem, choice):
            continue
        break
    return choice


def repair(problem: Problem, choice: NDArray[np.intp]) -> NDArray[np.intp] | None:
    """Move an infeasible choice into the budgets, each step cutting the normalised excess most.

    Returns the repaired choice, or ``None`` when no single move reduces the excess.
    """
    scale = np.maximum(np.abs(problem.capacities), 1e-300)
    for _ in range(problem.n_items * problem.n_choices + 1):
        d_val, d_cost, room = _deltas(problem, choice)
        excess = np.maximum(-room, 0.0) / scale
        if not excess.any():
            return choice
        after = (np.maximum(d_cost - room[:, None, None], 0.0) / scale[:, None, None]).sum(axis=0)
        cut = np.where(problem.allowed, excess.sum() - after, -np.inf)
        best = cut.max()
        if not best > 0:
            return None
        # Among the moves that cut the excess most, the one losing the least.
        tie = cut >= best * (1 - 1e-9)
        flat = int(np.where(tie, d_val, np.inf).argmin())
        i, j = divmod(flat, problem.n_choices)
        choice[i] = j
    return None
