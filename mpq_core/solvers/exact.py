"""Exact MCKP by mixed-integer programming (scipy.optimize.milp, i.e. HiGHS).

Binary ``x[i][j]`` for every allowed choice, one equality row per item (exactly one choice),
one inequality row per budget. Used for several budgets at once and to check the greedy.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from mpq_core.errors import BudgetInfeasible, MpqError
from mpq_core.solvers.problem import CAPACITY_RTOL, Problem, Solution

__all__ = ["solve_exact"]

_FD_LOCK = threading.Lock()


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send C-level stdout to stderr: HiGHS 1.12 prints a stray debug line from its MIP
    presolve (ERGO-Code/HiGHS#2783), which would corrupt ``--json`` output."""
    with _FD_LOCK:
        sys.stdout.flush()
        try:
            saved = os.dup(1)
        except OSError:
            yield
            return
        try:
            os.dup2(2, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def solve_exact(problem: Problem, *, time_limit: float = 60.0, rel_gap: float = 1e-6) -> Solution:
    """Solve to optimality (within ``rel_gap``) with HiGHS.

    Args:
        problem: the instance.
        time_limit: seconds HiGHS may take; the best choice found by then is returned, with
            its proven bound in ``lower_bound``.
        rel_gap: relative optimality gap at which HiGHS stops.

    Raises:
        BudgetInfeasible: no choice meets all budgets together.

    Example:
        >>> p = Problem.build([[9.0, 0.0], [1.0, 0.5]], [([[1, 9], [1, 2]], 10.0)])
        >>> solve_exact(p).choice.tolist()
        [1, 0]
    """
    t0 = time.perf_counter()
    problem.check_each_constraint()
    n, m = problem.values.shape
    ii, jj = np.nonzero(problem.allowed)
    nv = ii.size
    obj = problem.values[ii, jj]
    obj_scale = float(np.abs(obj).max()) or 1.0
    one_hot = csr_array((np.ones(nv), (ii, np.arange(nv))), shape=(n, nv))
    caps = problem.capacities.copy()
    row_scale = np.maximum(np.abs(caps), np.abs(problem.costs[:, ii, jj]).max(axis=1, initial=0.0))
    row_scale = np.where(row_scale > 0, row_scale, 1.0)
    for _attempt in range(4):
        rows = problem.costs[:, ii, jj] / row_scale[:, None]
        tol = CAPACITY_RTOL * np.maximum(1.0, np.abs(caps)) / row_scale
        with _stdout_to_stderr():
            res = milp(
                obj / obj_scale,
                constraints=[
                    LinearConstraint(one_hot, 1.0, 1.0),
                    LinearConstraint(rows, -np.inf, caps / row_scale + tol),
                ],
                integrality=np.ones(nv),
                bounds=Bounds(0.0, 1.0),
                options={
                    "time_limit": float(time_limit),
                    "mip_rel_gap": float(rel_gap),
                },
            )
        if res.status == 2:
            raise BudgetInfeasible(
                "the budgets cannot all be met together with the candidate bits and pins; "
                "each one alone can, so loosen one of them"
            )
        if res.x is None:
            raise MpqError(f"the exact solver failed: {res.message}", code="solver_failed")
        x = np.asarray(res.x).reshape(-1)
        score = np.full((n, m), -1.0)
        score[ii, jj] = x
        choice: NDArray[np.intp] = score.argmax(axis=1).astype(np.intp)
        totals = problem.totals(choice)
        if problem.is_feasible(choice):
            bound = getattr(res, "mip_dual_bound", None)
            return Solution(
                choice=choice,
                objective=problem.objective(choice),
                method="exact",
                seconds=time.perf_counter() - t0,
                lower_bound=None if bound is None else float(bound) * obj_scale,
            )
        # HiGHS meets rows only to its feasibility tolerance (~1e-6 of a scaled row): tighten
        # the rows that overshot and solve again.
        over = totals > problem.capacities
        caps = caps - np.where(
            over, np.maximum(2.0 * (totals - problem.capacities), 1e-6 * row_scale), 0.0
        )
    raise MpqError("the exact solver could not meet the budgets exactly", code="solver_failed")
