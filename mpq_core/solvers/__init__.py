"""Multiple-choice knapsack solvers for bit allocation (pure numpy/scipy, no torch).

- :func:`hull_greedy`: the paper's greedy over each item's lower convex hull.
- :func:`solve_greedy`: that greedy refined (restarts on big items, local search, and an exact
  Pareto search on small single-budget instances); the default.
- :func:`solve_exact`: mixed-integer programming with HiGHS.
- :func:`solve`: pick one by name (``greedy``, ``exact``, ``auto``).
"""

from __future__ import annotations

import time

from mpq_core.errors import SpecError
from mpq_core.solvers.exact import solve_exact
from mpq_core.solvers.greedy import hull_greedy, solve_greedy
from mpq_core.solvers.problem import CAPACITY_RTOL, Problem, Solution, fits
from mpq_core.spec import Solver

__all__ = [
    "AUTO_EXACT_MAX_VARIABLES",
    "AUTO_GAP",
    "CAPACITY_RTOL",
    "SOLVERS",
    "Problem",
    "Solution",
    "SolverName",
    "fits",
    "hull_greedy",
    "solve",
    "solve_exact",
    "solve_greedy",
]

#: The solver names, as :class:`mpq_core.spec.Solver` defines them.
SOLVERS: tuple[str, ...] = tuple(s.value for s in Solver)
SolverName = Solver

# ``auto`` calls the exact solver when the greedy cannot prove it is this close to the optimum
# and the instance has at most this many binary variables.
AUTO_GAP = 0.001
AUTO_EXACT_MAX_VARIABLES = 6_000


def solve(problem: Problem, method: str = "auto", *, time_limit: float = 60.0) -> Solution:
    """Solve an MCKP instance.

    Args:
        problem: the instance.
        method: ``greedy`` (refined greedy), ``exact`` (MILP), or ``auto``: the greedy, then the
            MILP when the greedy's proven gap exceeds :data:`AUTO_GAP` (always, for several
            budgets) and the instance is small enough for it to be quick.
        time_limit: seconds allowed to the MILP.

    Example:
        >>> p = Problem.build([[9.0, 0.0], [1.0, 0.5]], [([[1, 9], [1, 2]], 10.0)])
        >>> solve(p, "auto").choice.tolist()
        [1, 0]
    """
    if method == Solver.GREEDY:
        return solve_greedy(problem)
    if method == Solver.EXACT:
        return solve_exact(problem, time_limit=time_limit)
    if method != Solver.AUTO:
        raise SpecError(f"unknown solver {method!r}; use one of {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    sol = solve_greedy(problem)
    gap = sol.gap_bound
    small = int(problem.allowed.sum()) <= AUTO_EXACT_MAX_VARIABLES
    if small and (gap is None or gap > AUTO_GAP):
        exact = solve_exact(problem, time_limit=time_limit)
        if exact.objective < sol.objective:
            sol = exact
        sol.method = f"{sol.method} (auto)"
    sol.seconds = time.perf_counter() - t0
    return sol
