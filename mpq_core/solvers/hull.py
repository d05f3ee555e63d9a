"""Per-item lower convex hulls of (cost, value), flattened into one list of upgrades.

A choice is worth taking only if it lies on the lower-left convex hull of its item's
(cost, value) points: anything above the hull is beaten by a mix of its neighbours. Walking the
hull from the cheapest point gives a chain of upgrades whose value saved per unit cost falls
along the chain, so sorting all items' upgrades by that ratio yields an order in which each
item's upgrades come one after the other. That sorted list is what the greedy consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Upgrades", "hull_upgrades"]


@dataclass(frozen=True)
class Upgrades:
    """The hull chains of every item and their upgrades sorted by efficiency.

    Attributes:
        base: ``(n,)`` the cheapest choice of each item (the start of its chain).
        vertices: ``(n, m)`` choice index of hull vertex ``t`` of item ``i`` (``-1`` past the end).
        item: ``(s,)`` the item each upgrade belongs to.
        step: ``(s,)`` its position in the item's chain (upgrade ``t`` goes vertex t -> t+1).
        efficiency: ``(s,)`` value saved per unit of (ranking) cost, non-increasing.
        gain: ``(s,)`` value change (negative: the loss falls).
        cost: ``(k, s)`` cost change under every constraint.
    """

    base: NDArray[np.intp]
    vertices: NDArray[np.intp]
    item: NDArray[np.intp]
    step: NDArray[np.intp]
    efficiency: NDArray[np.float64]
    gain: NDArray[np.float64]
    cost: NDArray[np.float64]


def hull_upgrades(
    values: NDArray[np.float64],
    rank_cost: NDArray[np.float64],
    allowed: NDArray[np.bool_],
    costs: NDArray[np.float64],
) -> Upgrades:
    """Build every item's lower convex hull over ``(rank_cost, values)`` and sort the upgrades.

    Vectorised over items; loops only over the (few) choices.

    Args:
        values: ``(n, m)`` loss per item and choice.
        rank_cost: ``(n, m)`` the single cost the hull is taken over (the budget's cost, or a
            weighted sum of several budgets' costs).
        allowed: ``(n, m)`` allowed choices.
        costs: ``(k, n, m)`` every constraint's cost, to report each upgrade's cost change.
    """
    n, m = values.shape
    rows = np.arange(n)
    cost = np.where(allowed, rank_cost, np.inf)
    lowest = cost.min(axis=1, keepdims=True)
    base = np.where(allowed & (cost == lowest), values, np.inf).argmin(axis=1).astype(np.intp)

    vertices = np.full((n, m), -1, dtype=np.intp)
    vertices[:, 0] = base
    cur = base.copy()
    active = np.ones(n, dtype=bool)
    prev_eff = np.full(n, np.inf)
    seg_item: list[NDArray[np.intp]] = []
    seg_step: list[NDArray[np.intp]] = []
    seg_eff: list[NDArray[np.float64]] = []
    seg_from: list[NDArray[np.intp]] = []
    seg_to: list[NDArray[np.intp]] = []
    for t in range(m - 1):
        d_cost = rank_cost - rank_cost[rows, cur][:, None]
        d_val = values - values[rows, cur][:, None]
        ok = allowed & (d_cost > 0) & (d_val < 0) & active[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(ok, d_val / np.where(ok, d_cost, 1.0), np.inf)
        best = slope.min(axis=1)
        has = np.isfinite(best)
        if not has.any():
            break
        # Among equally steep points take the nearest: smaller steps fit a budget more easily.
        tie = ok & (slope <= best[:, None] + 1e-12 * np.abs(best[:, None]))
        nxt = np.where(tie, d_cost, np.inf).argmin(axis=1).astype(np.intp)
        idx = np.flatnonzero(has)
        # Convexity makes efficiency fall along a chain; clamp so float noise cannot reorder it.
        eff = np.minimum(-best[idx], prev_eff[idx])
        prev_eff[idx] = eff
        seg_item.append(idx.astype(np.intp))
        seg_step.append(np.full(idx.size, t, dtype=np.intp))
        seg_eff.append(eff)
        seg_from.append(cur[idx])
        seg_to.append(nxt[idx])
        vertices[idx, t + 1] = nxt[idx]
        cur = np.where(has, nxt, cur)
        active &= has

    if seg_item:
        item = np.concatenate(seg_item)
        step = np.concatenate(seg_step)
        efficiency = np.concatenate(seg_eff)
        frm = np.concatenate(seg_from)
        to = np.concatenate(seg_to)
    else:
        item = step = frm = to = np.zeros(0, dtype=np.intp)
        efficiency = np.zeros(0)
    order = np.lexsort((step, item, -efficiency))
    item, step, frm, to = item[order], step[order], frm[order], to[order]
    return Upgrades(
        base=base,
        vertices=vertices,
        item=item,
        step=step,
        efficiency=efficiency[order],
        gain=values[item, to] - values[item, frm],
        cost=costs[:, item, to] - costs[:, item, frm],
    )
