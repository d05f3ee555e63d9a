"""Bit allocation: a sensitivity table plus budgets in, one bit width per layer out.

Pure Python + numpy/scipy (no torch): the API may re-solve a stored table for a new budget.

Pins and ties are regular expressions matched against the whole layer name (a full match, with
RE2 so that matching takes bounded time, see :mod:`mpq_core.patterns`):
``features\\.0\\.weight`` names one layer, ``classifier\\..*`` every classifier weight. A plain
name also matches itself (a ``.`` matches any character). A pattern that matches no layer is an
error, so a typo cannot silently leave a layer free.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpq_core.budgets import Budget, achieved, budget_constraint, format_value
from mpq_core.errors import BudgetInfeasible, SpecError
from mpq_core.layers import LayerInfo
from mpq_core.patterns import compile_pattern
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.solvers import SOLVERS, Problem, fits, solve
from mpq_core.spec import JobSpec

__all__ = [
    "SCHEMA_VERSION",
    "Allocation",
    "BudgetReport",
    "FileBytes",
    "LayerAllocation",
    "allocate",
    "allocate_bits",
    "checkpoint_overhead",
    "solve_bits",
]

#: ``bits_by_layer -> bytes`` of the file a size budget is held to.
FileBytes = Callable[[dict[str, int]], int]
#: Budgets on bytes: with a ``file_bytes``, they hold on the written file.
_FILE_BUDGETS = ("size", "compression")
#: Solves until the header settles (it changes by a few bytes between allocations).
_FILE_ROUNDS = 6

SCHEMA_VERSION = 1


@dataclass
class LayerAllocation:
    """The bit width chosen for one layer.

    Attributes:
        layer: the layer (name, kind, shape, params, channels, MACs).
        bits: the chosen bit width.
        omega: the layer's sensitivity row over the candidate bits.
        costs: the layer's cost under each budget of the allocation, in the budget's
            constraint unit (bits of weights, bytes, bit-operations, table units).
    """

    layer: LayerInfo
    bits: int
    omega: dict[int, float]
    costs: list[float]

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def params(self) -> int:
        return self.layer.params

    @property
    def macs(self) -> int:
        return self.layer.macs

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.layer.to_dict(),
            "bits": self.bits,
            "omega": {str(b): v for b, v in self.omega.items()},
            "cost": list(self.costs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerAllocation:
        return cls(
            layer=LayerInfo.from_dict(d),
            bits=int(d["bits"]),
            omega={int(b): float(v) for b, v in d["omega"].items()},
            costs=[float(c) for c in d["cost"]],
        )


@dataclass
class BudgetReport:
    """One budget as asked and as achieved (in the budget's own unit)."""

    budget: Budget
    achieved: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "label": self.budget.label(),
            "unit": self.budget.unit,
            "asked": self.budget.value,
            "achieved": self.achieved,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetReport:
        return cls(budget=Budget.from_dict(d["budget"]), achieved=float(d["achieved"]))


@dataclass
class Allocation:
    """A per-layer bit allocation and what it spends.

    Attributes:
        layers: one entry per quantizable layer, in model order.
        budgets: every budget, asked and achieved.
        predicted_loss_increase: sum of the chosen Omega entries.
        solver: the solver that produced it (``greedy``, ``greedy+exact``, ``exact``, ...).
        solve_seconds: wall time of the solve.
        candidate_bits: the bit widths that were allowed.
        float_params: parameters left in float32.
        pins: the pins asked (regex -> bits).
        ties: the tie patterns asked.
        lower_bound: a proven lower bound on the best reachable loss increase, where known.
        meta: provenance copied from the sensitivity table.
        raised: per layer, the bit widths whose Omega was raised to that of a wider width
            (fewer bits never predict less harm; see :func:`monotone_envelope`).
    """

    layers: list[LayerAllocation]
    budgets: list[BudgetReport]
    predicted_loss_increase: float
    solver: str
    solve_seconds: float
    candidate_bits: list[int]
    float_params: int = 0
    pins: dict[str, int] = field(default_factory=dict)
    ties: list[str] = field(default_factory=list)
    lower_bound: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    raised: dict[str, list[int]] = field(default_factory=dict)

    def bits_by_layer(self) -> dict[str, int]:
        return {la.name: la.bits for la in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "mpq.allocation",
            "solver": self.solver,
            "solve_seconds": self.solve_seconds,
            "candidate_bits": list(self.candidate_bits),
            "float_params": self.float_params,
            "predicted_loss_increase": self.predicted_loss_increase,
            "lower_bound": self.lower_bound,
            "pins": dict(self.pins),
            "ties": list(self.ties),
            "budgets": [b.to_dict() for b in self.budgets],
            "layers": [la.to_dict() for la in self.layers],
            "omega_raised": {name: list(bits) for name, bits in self.raised.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        if d.get("kind") != "mpq.allocation":
            raise SpecError("not an mpq allocation (expected kind 'mpq.allocation')")
        if int(d.get("schema_version", 0)) > SCHEMA_VERSION:
            raise SpecError(
                f"allocation schema_version {d.get('schema_version')} is newer than this mpq "
                f"understands ({SCHEMA_VERSION}); upgrade mpq"
            )
        try:
            bound = d.get("lower_bound")
            return cls(
                layers=[LayerAllocation.from_dict(row) for row in d["layers"]],
                budgets=[BudgetReport.from_dict(b) for b in d["budgets"]],
                predicted_loss_increase=float(d["predicted_loss_increase"]),
                solver=str(d["solver"]),
                solve_seconds=float(d["solve_seconds"]),
                candidate_bits=[int(b) for b in d["candidate_bits"]],
                float_params=int(d.get("float_params", 0)),
                pins={str(k): int(v) for k, v in d.get("pins", {}).items()},
                ties=[str(t) for t in d.get("ties", [])],
                lower_bound=None if bound is None else float(bound),
                meta=dict(d.get("meta", {})),
                raised={str(k): [int(b) for b in v] for k, v in d.get("omega_raised", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed allocation: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read allocation {path}: {exc}") from exc
        return cls.from_dict(data)


def _matching(pattern: str, names: Sequence[str], what: str) -> list[int]:
    # RE2 (mpq_core.patterns): a user's pattern cannot backtrack for hours on a long name.
    hits = compile_pattern(pattern, what).matching(names)
    if not hits:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise SpecError(
            f"{what} {pattern!r} matches no layer (matched against the whole name; layers: {shown})"
        )
    return hits


def monotone_envelope(
    omega: NDArray[np.float64], names: Sequence[str], bits: Sequence[int]
) -> tuple[NDArray[np.float64], dict[str, list[int]]]:
    """Each layer's Omega made non-increasing in the bit width (``bits`` ascending).

    The Fisher estimate of a layer's loss rise at ``b`` bits is a mean of squared projections
    of its quantization error on the samples' gradients; with few samples, a 2-bit error can
    happen to lie closer to orthogonal to them than a 3-bit one and score lower. Taking fewer
    bits on that evidence would trust noise, so an entry is raised to the largest entry at any
    wider width. Returns the envelope and, per raised layer, the widths that were raised.
    """
    envelope = np.maximum.accumulate(omega[:, ::-1], axis=1)[:, ::-1]
    raised = {
        names[i]: [int(bits[j]) for j in np.flatnonzero(envelope[i] > omega[i]).tolist()]
        for i in np.flatnonzero((envelope > omega).any(axis=1)).tolist()
    }
    return envelope, raised


def _candidate_bits(table: SensitivityTable, bits: Sequence[int] | None) -> list[int]:
    if bits is None:
        return list(table.bits)
    chosen = sorted({int(b) for b in bits})
    if not chosen:
        raise SpecError("the candidate bit list is empty")
    missing = [b for b in chosen if b not in table.bits]
    if missing:
        raise SpecError(
            f"bit widths {missing} are not in the sensitivity table (it has {table.bits})"
        )
    return chosen


def _pinned(names: Sequence[str], pins: dict[str, int], bits: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for pattern, b in pins.items():
        if b not in bits:
            raise SpecError(f"pin {pattern}={b}: {b} bits is not a candidate (candidates {bits})")
        for i in _matching(pattern, names, "pin"):
            if out.get(i, b) != b:
                raise SpecError(f"layer {names[i]!r} is pinned to both {out[i]} and {b} bits")
            out[i] = b
    return out


def _groups(names: Sequence[str], ties: Sequence[str]) -> list[list[int]]:
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pattern in ties:
        hits = _matching(pattern, names, "tie")
        for i in hits[1:]:
            parent[root(i)] = root(hits[0])
    groups: dict[int, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _achieved(budget: Budget, table: SensitivityTable, chosen: Sequence[int]) -> float:
    """What ``chosen`` reaches in ``budget``, with the table's sizes of what stays float."""
    return achieved(
        budget,
        table.layers,
        table.float_params,
        chosen,
        model_bytes=table.model_bytes,
        float_bytes=table.float_bytes,
        scheme=table.scheme,
    )


def _infeasible_message(budget: Budget, table: SensitivityTable, cheapest: Sequence[int]) -> str:
    best = _achieved(budget, table, cheapest)
    word = "highest" if budget.kind == "compression" else "smallest"
    if len(set(cheapest)) == 1:
        where = f"all layers at {cheapest[0]} bits"
    else:
        where = "every layer at its cheapest allowed bit width"
    return (
        f"{budget.label()} cannot be met: the {word} achievable is "
        f"{format_value(budget.kind, best)} with {where} (pins included)"
    )


def _per_group(
    matrix: NDArray[np.float64], owner: NDArray[np.intp], groups: int
) -> NDArray[np.float64]:
    """Per-layer rows summed into one row per tie group."""
    out = np.zeros((groups, matrix.shape[1]))
    np.add.at(out, owner, matrix)
    return out


def _allowed_choices(
    names: list[str],
    groups: list[list[int]],
    owner: NDArray[np.intp],
    pinned: dict[int, int],
    cand: list[int],
) -> NDArray[np.bool_]:
    """Which candidate bits each tie group may take, given the pins."""
    allowed = np.ones((len(groups), len(cand)), dtype=bool)
    for i, b in pinned.items():
        allowed[owner[i]] &= np.array(cand) == b
    for g, members in enumerate(groups):
        if not allowed[g].any():
            got = sorted({pinned[i] for i in members if i in pinned})
            raise SpecError(
                f"tied layers {[names[i] for i in members]} are pinned to different bit "
                f"widths {got}"
            )
    return allowed


def _budget_constraints(
    table: SensitivityTable,
    budgets: Sequence[Budget],
    cand: list[int],
    owner: NDArray[np.intp],
    allowed: NDArray[np.bool_],
) -> tuple[list[NDArray[np.float64]], list[tuple[NDArray[np.float64], float]]]:
    """Per-layer costs and per-group constraints of every budget; BudgetInfeasible when even
    the cheapest allowed choice breaks one."""
    layers, groups = table.layers, allowed.shape[0]
    layer_costs: list[NDArray[np.float64]] = []
    constraints: list[tuple[NDArray[np.float64], float]] = []
    for budget in budgets:
        costs, cap = budget_constraint(
            budget,
            layers,
            cand,
            float_params=table.float_params,
            model_bytes=table.model_bytes,
            float_bytes=table.float_bytes,
            scheme=table.scheme,
        )
        grouped = _per_group(costs, owner, groups)
        low = np.where(allowed, grouped, np.inf).argmin(axis=1)
        if not fits(float(grouped[np.arange(groups), low].sum()), cap):
            cheapest = [cand[int(low[owner[i]])] for i in range(len(layers))]
            raise BudgetInfeasible(_infeasible_message(budget, table, cheapest))
        layer_costs.append(costs)
        constraints.append((grouped, cap))
    return layer_costs, constraints


def allocate(
    table: SensitivityTable, spec: JobSpec, *, file_bytes: FileBytes | None = None
) -> Allocation:
    """The allocation a job spec asks for: its budgets, candidate bits, pins, ties and solver
    (``file_bytes``: see :func:`allocate_bits`).

    Example:
        >>> allocate(table, JobSpec(budgets=["avg-bits=3"], bits=table.bits))  # doctest: +SKIP
    """
    return allocate_bits(
        table,
        spec.parsed_budgets(),
        bits=spec.bits,
        pins=spec.pins,
        ties=spec.ties,
        solver=spec.solver.value,
        file_bytes=file_bytes,
    )


def _reports(
    table: SensitivityTable, budgets: Sequence[Budget], chosen: Sequence[int]
) -> list[BudgetReport]:
    """Every budget with what the chosen bits reach in it."""
    return [BudgetReport(b, _achieved(b, table, chosen)) for b in budgets]


def allocate_bits(
    table: SensitivityTable,
    budgets: Sequence[Budget],
    *,
    bits: Sequence[int] | None = None,
    pins: dict[str, int] | None = None,
    ties: Sequence[str] = (),
    solver: str = "auto",
    file_bytes: FileBytes | None = None,
) -> Allocation:
    """:func:`solve_bits`; with ``file_bytes`` (``bits_by_layer -> bytes`` of the packed
    checkpoint, :func:`mpq_core.packed_checkpoint.file_bytes_of`), ``size`` and
    ``compression`` budgets hold on the written file: its header and padding are counted
    as fixed bytes beside the float parameters, re-solving until the file fits.

    Raises:
        BudgetInfeasible: as :func:`solve_bits`, the header counted.
    """
    solve_with = functools.partial(solve_bits, budgets=budgets, bits=bits, pins=pins, ties=ties)
    if not any(b.kind in _FILE_BUDGETS for b in budgets):
        return solve_with(table, solver=solver)
    if file_bytes is None:  # no model to measure: the table's bound on the header, if any
        return solve_with(_counting(table, table.checkpoint_overhead_bytes or 0), solver=solver)
    extra = 0
    for _ in range(_FILE_ROUNDS):
        counted = _counting(table, extra)
        alloc = solve_with(counted, solver=solver)
        chosen = alloc.bits_by_layer()
        predicted = _achieved(Budget("size", 1.0), counted, [chosen[n] for n in table.names])
        written = file_bytes(chosen)
        if written <= predicted:
            return alloc
        extra += written - int(predicted)
    raise BudgetInfeasible(  # the header does not grow without bound; kept as a guard
        f"the packed checkpoint's header did not settle within {_FILE_ROUNDS} solves"
    )


def _counting(table: SensitivityTable, extra: int) -> SensitivityTable:
    """``table`` with ``extra`` bytes of the checkpoint counted beside its float parameters."""
    return dataclasses.replace(table, float_bytes=table.stored_float_bytes + extra)


def checkpoint_overhead(table: SensitivityTable, file_bytes: FileBytes) -> int:
    """A bound on what the packed checkpoint adds to the cost model's size for any allocation
    of this table: the most it adds at any one uniform width, plus a byte a layer (codes are
    padded to a byte) and 64 bytes for the compressed header's variation between allocations.
    """
    size = Budget("size", 1.0)
    worst = max(
        file_bytes(dict.fromkeys(table.names, b))
        - int(_achieved(size, table, [b] * len(table.layers)))
        for b in table.bits
    )
    return max(worst, 0) + len(table.layers) + 64


def solve_bits(
    table: SensitivityTable,
    budgets: Sequence[Budget],
    *,
    bits: Sequence[int] | None = None,
    pins: dict[str, int] | None = None,
    ties: Sequence[str] = (),
    solver: str = "auto",
) -> Allocation:
    """Choose a bit width per layer minimising the predicted loss increase within all budgets.

    Args:
        table: the sensitivity table (Omega per layer and bit width).
        budgets: one or more budgets, all of which must hold.
        bits: candidate bit widths (a subset of the table's); default all of the table's.
        pins: ``regex -> bits``; layers whose whole name matches are fixed at those bits.
        ties: regexes; the layers matching one pattern share one bit width (patterns that
            share a layer merge into one group).
        solver: ``greedy``, ``exact`` or ``auto`` (see :func:`mpq_core.solvers.solve`).

    Raises:
        SpecError: bad regex, a pattern matching no layer, a pin outside the candidates,
            conflicting pins, unknown solver.
        BudgetError: a ``table`` budget lacks a layer or bit width.
        BudgetInfeasible: the budgets cannot be met; the message gives the best achievable.

    Example:
        >>> from mpq_core.budgets import parse_budget
        >>> alloc = allocate_bits(table, [parse_budget("avg-bits=4")],  # doctest: +SKIP
        ...                       pins={r"features\\.0\\.weight": 8})
    """
    if not table.layers:
        raise SpecError("the sensitivity table has no layers to allocate")
    if not budgets:
        raise SpecError("at least one budget is needed")
    if solver not in SOLVERS:
        raise SpecError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    pins = dict(pins or {})
    cand = _candidate_bits(table, bits)
    names = table.names
    layers = table.layers
    omega = np.array(table.omega, dtype=np.float64)[:, [table.bits.index(b) for b in cand]]
    omega, raised = monotone_envelope(omega, names, cand)
    pinned = _pinned(names, pins, cand)
    groups = _groups(names, ties)
    owner = np.empty(len(layers), dtype=np.intp)
    for g, members in enumerate(groups):
        owner[members] = g
    allowed = _allowed_choices(names, groups, owner, pinned, cand)
    layer_costs, constraints = _budget_constraints(table, budgets, cand, owner, allowed)
    problem = Problem.build(_per_group(omega, owner, len(groups)), constraints, allowed)
    t0 = time.perf_counter()
    sol = solve(problem, solver)
    seconds = time.perf_counter() - t0

    chosen_col = sol.choice[owner]
    chosen = [cand[int(j)] for j in chosen_col]
    rows = [
        LayerAllocation(
            layer=layer,
            bits=chosen[i],
            omega={b: float(v) for b, v in zip(cand, omega[i], strict=True)},
            costs=[float(c[i, chosen_col[i]]) for c in layer_costs],
        )
        for i, layer in enumerate(layers)
    ]
    return Allocation(
        layers=rows,
        budgets=_reports(table, budgets, chosen),
        predicted_loss_increase=float(omega[np.arange(len(layers)), chosen_col].sum()),
        solver=sol.method,
        solve_seconds=seconds,
        candidate_bits=cand,
        float_params=table.float_params,
        pins=pins,
        ties=list(ties),
        lower_bound=sol.lower_bound,
        meta=dict(table.meta),
        raised=raised,
    )
