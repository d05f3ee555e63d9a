"""The multiple-choice knapsack problem (MCKP) the allocators solve, and what they return.

One item per layer (or tied group), one choice per item (a bit width). Each choice has a value
(predicted loss increase, lower is better) and one cost per constraint; every constraint says
``sum_i costs[i][choice_i] <= capacity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mpq_core.errors import BudgetInfeasible, SpecError

__all__ = ["CAPACITY_RTOL", "Problem", "Solution", "fits"]

# Totals are float sums; a total within this relative distance of its capacity counts as fitting,
# so that e.g. ``avg-bits=4`` is met by every layer at exactly 4 bits.
CAPACITY_RTOL = 1e-9


def fits(total: float | NDArray[np.float64], capacity: float | NDArray[np.float64]) -> bool:
    """Whether ``total <= capacity`` up to :data:`CAPACITY_RTOL` (elementwise, all must hold)."""
    cap = np.asarray(capacity, dtype=np.float64)
    slack = CAPACITY_RTOL * np.maximum(1.0, np.abs(cap))
    return bool(np.all(np.asarray(total, dtype=np.float64) <= cap + slack))


@dataclass(frozen=True)
class Problem:
    """An MCKP instance with one or more additive constraints.

    Attributes:
        values: ``(n, m)`` loss of item ``i`` at choice ``j``; lower is better.
        costs: ``(k, n, m)`` cost of item ``i`` at choice ``j`` under constraint ``k``.
        capacities: ``(k,)`` the most each constraint's total may be.
        allowed: ``(n, m)`` which choices each item may take (every row has at least one).
    """

    values: NDArray[np.float64]
    costs: NDArray[np.float64]
    capacities: NDArray[np.float64]
    allowed: NDArray[np.bool_]

    @classmethod
    def build(
        cls,
        values: ArrayLike,
        constraints: Sequence[tuple[ArrayLike, float]],
        allowed: ArrayLike | None = None,
    ) -> Problem:
        """Validate and pack an instance.

        Args:
            values: ``V[i][j]``, the loss of item ``i`` at choice ``j``.
            constraints: one ``(costs, capacity)`` pair per budget, ``costs[i][j]`` like ``V``.
            allowed: optional boolean mask of the choices each item may take.

        Example:
            >>> p = Problem.build([[3.0, 1.0]], [([[2.0, 4.0]], 4.0)])
            >>> p.n_items, p.n_choices, p.n_constraints
            (1, 2, 1)
        """
        v = np.array(values, dtype=np.float64, ndmin=2)
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise SpecError(f"values must be a non-empty (items, choices) matrix, got {v.shape}")
        if not constraints:
            raise SpecError("at least one constraint (budget) is needed")
        c = np.stack([np.array(cm, dtype=np.float64, ndmin=2) for cm, _ in constraints])
        if c.shape[1:] != v.shape:
            raise SpecError(f"cost matrices must have the values' shape {v.shape}, got {c.shape}")
        caps = np.array([float(cap) for _, cap in constraints], dtype=np.float64)
        mask = np.ones(v.shape, dtype=bool) if allowed is None else np.array(allowed, dtype=bool)
        if mask.shape != v.shape:
            raise SpecError(f"allowed mask must have the values' shape {v.shape}")
        if not mask.any(axis=1).all():
            raise SpecError("every item needs at least one allowed choice")
        for name, arr in (("values", v), ("costs", c), ("capacities", caps)):
            if not np.isfinite(arr).all():
                raise SpecError(f"{name} must be finite numbers")
        return cls(values=v, costs=c, capacities=caps, allowed=mask)

    @property
    def n_items(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_choices(self) -> int:
        return int(self.values.shape[1])

    @property
    def n_constraints(self) -> int:
        return int(self.costs.shape[0])

    def objective(self, choice: NDArray[np.intp]) -> float:
        return float(self.values[np.arange(self.n_items), choice].sum())

    def totals(self, choice: NDArray[np.intp]) -> NDArray[np.float64]:
        """Total cost of ``choice`` under every constraint."""
        return self.costs[:, np.arange(self.n_items), choice].sum(axis=1)

    def is_feasible(self, choice: NDArray[np.intp]) -> bool:
        idx = np.arange(self.n_items)
        return bool(self.allowed[idx, choice].all()) and fits(self.totals(choice), self.capacities)

    def cheapest(self, k: int) -> NDArray[np.intp]:
        """Per item, the allowed choice of least cost under constraint ``k`` (then least value)."""
        cost = np.where(self.allowed, self.costs[k], np.inf)
        lowest = cost.min(axis=1, keepdims=True)
        ties = self.allowed & (cost == lowest)
        return np.asarray(np.where(ties, self.values, np.inf).argmin(axis=1), dtype=np.intp)

    def check_each_constraint(self) -> None:
        """Raise :class:`BudgetInfeasible` if some constraint fails even at its cheapest choices.

        Callers that know the budgets' units check first and give a better message; this is the
        solvers' own guard.
        """
        for k in range(self.n_constraints):
            low = float(self.totals(self.cheapest(k))[k])
            if not fits(low, self.capacities[k]):
                raise BudgetInfeasible(
                    f"constraint {k} cannot be met: the smallest achievable total is {low:.6g}, "
                    f"above its capacity {self.capacities[k]:.6g}"
                )


@dataclass
class Solution:
    """A choice per item and how it was found.

    Attributes:
        choice: ``(n,)`` index of the chosen column per item.
        objective: total value of the choice.
        method: which solver produced it (``hull-greedy``, ``greedy``, ``exact``, ...).
        seconds: wall time of the solve.
        lower_bound: a proven lower bound on the optimum, where the solver has one.
    """

    choice: NDArray[np.intp]
    objective: float
    method: str
    seconds: float = 0.0
    lower_bound: float | None = None

    @property
    def gap_bound(self) -> float | None:
        """Proven relative distance to the optimum, ``(objective - bound) / objective``."""
        if self.lower_bound is None:
            return None
        if self.objective <= 0.0:
            return 0.0
        return max(0.0, (self.objective - self.lower_bound) / self.objective)
