"""Exact single-budget MCKP for small instances: dynamic programming over Pareto states.

Items are added one at a time; a state is a partial choice's (cost, value). States beaten on both
are dropped, and so is any state whose value plus the LP relaxation of the items still to come
(a convex piecewise-linear function of the room left) cannot beat the incumbent. Capped in
states so it stays fast; when the cap is hit the search gives up and proves nothing.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from mpq_core.solvers.hull import Upgrades
from mpq_core.solvers.problem import CAPACITY_RTOL, Problem

__all__ = ["MAX_STATES", "pareto_search"]

MAX_STATES = 50_000


def _suffix_bounds(
    problem: Problem, up: Upgrades, order: NDArray[np.intp]
) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """For every suffix of ``order``: breakpoints (room, LP optimum) of its relaxation."""
    cost, values = problem.costs[0], problem.values
    n = order.size
    pos = np.empty(n, dtype=np.intp)
    pos[order] = np.arange(n)
    seg_pos = pos[up.item]
    out: list[tuple[NDArray[np.float64], NDArray[np.float64]]] = []
    for p in range(n + 1):
        items = order[p:]
        base_cost = float(cost[items, up.base[items]].sum())
        base_value = float(values[items, up.base[items]].sum())
        sel = seg_pos >= p  # upgrades stay sorted by efficiency after selection
        xs = base_cost + np.concatenate(([0.0], np.cumsum(up.cost[0][sel])))
        ys = base_value + np.concatenate(([0.0], np.cumsum(up.gain[sel])))
        out.append((xs, ys))
    return out


def pareto_search(
    problem: Problem, up: Upgrades, *, incumbent: float, max_states: int = MAX_STATES
) -> tuple[NDArray[np.intp] | None, bool]:
    """Search for a choice better than ``incumbent`` (single budget).

    Args:
        problem: a one-constraint instance.
        up: its hull upgrades ranked by that constraint's cost.
        incumbent: the value to beat.
        max_states: give up when more states than this survive one item.

    Returns:
        ``(choice, proven)``: the best choice found below the incumbent (or ``None``), and
        whether the search finished, i.e. the result (or the incumbent) is optimal.
    """
    cost, values, allowed = problem.costs[0], problem.values, problem.allowed
    cap = float(problem.capacities[0])
    cap += CAPACITY_RTOL * max(1.0, abs(cap))
    low = np.where(allowed, cost, np.inf).min(axis=1)
    high = np.where(allowed, cost, -np.inf).max(axis=1)
    order = np.argsort(-(high - low), kind="stable").astype(np.intp)
    bounds = _suffix_bounds(problem, up, order)
    low_rest = np.concatenate((np.cumsum(low[order][::-1])[::-1], [0.0]))
    cut = incumbent - 1e-9 * max(abs(incumbent), 1e-300)

    st_cost = np.zeros(1)
    st_value = np.zeros(1)
    parents: list[NDArray[np.intp]] = []
    picks: list[NDArray[np.intp]] = []
    for p, i in enumerate(order.tolist()):
        js = np.flatnonzero(allowed[i])
        new_cost = (st_cost[:, None] + cost[i, js][None, :]).ravel()
        new_value = (st_value[:, None] + values[i, js][None, :]).ravel()
        parent = np.repeat(np.arange(st_cost.size), js.size)
        pick = np.tile(js, st_cost.size)
        room = cap - new_cost
        xs, ys = bounds[p + 1]
        lp = np.interp(room, xs, ys)
        keep = (room >= low_rest[p + 1]) & (new_value + lp < cut)
        # keep only Pareto states: cheaper, or strictly lower value than every cheaper state
        idx = np.flatnonzero(keep)
        idx = idx[np.lexsort((new_value[idx], new_cost[idx]))]
        vals = new_value[idx]
        if vals.size:
            best_before = np.minimum.accumulate(vals)
            front = np.ones(vals.size, dtype=bool)
            front[1:] = vals[1:] < best_before[:-1]
            idx = idx[front]
        if idx.size == 0:
            return None, True
        if idx.size > max_states:
            return None, False
        st_cost, st_value = new_cost[idx], new_value[idx]
        parents.append(parent[idx])
        picks.append(pick[idx])
    s = int(st_value.argmin())
    choice = np.empty(problem.n_items, dtype=np.intp)
    for p in range(order.size - 1, -1, -1):
        choice[order[p]] = picks[p][s]
        s = int(parents[p][s])
    return choice, True
