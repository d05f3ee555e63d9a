"""The trade-off curve without torch: sweep budgets parsed, their allocations solved from one
sensitivity table, and the curve as a JSON document (``curve.json``).

Pure Python + numpy (no torch), like :mod:`mpq_core.allocation`: the API may validate a spec's
``sweep`` and read a stored curve. Measuring each point (quantize, evaluate) is
:mod:`mpq_core.sweep`'s work.

A sweep entry is one budget (``avg-bits=3``) or an inclusive range of budgets of one kind,
``KIND=START:STOP:STEP`` with each part in the kind's units: ``avg-bits=2:8:0.5``,
``size=1MB:4MB:0.5MB``, ``compression=2x:8x:2``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq_core.budgets import Budget, achieved, parse_budget
from mpq_core.errors import BudgetError, BudgetInfeasible, SpecError
from mpq_core.sensitivity_table import SensitivityTable

if TYPE_CHECKING:  # allocation imports the spec, which parses sweeps with this module
    from mpq_core.allocation import Allocation, FileBytes

__all__ = [
    "CURVE_NAME",
    "CURVE_SCHEMA_VERSION",
    "MAX_SWEEP_POINTS",
    "Curve",
    "CurvePoint",
    "PlannedPoint",
    "parse_sweep",
    "plan_mixed",
    "plan_uniform",
    "predicted_size",
    "write_curve",
]

CURVE_SCHEMA_VERSION = 1
CURVE_NAME = "curve.json"
#: At most this many budgets in one sweep (each point quantizes and evaluates the model once).
MAX_SWEEP_POINTS = 64
_FORM = "a sweep entry is KIND=VALUE or KIND=START:STOP:STEP, e.g. avg-bits=2:8:0.5"


def _entry(text: str, act_bits: int, table_layers: Any) -> list[Budget]:
    """The budgets of one sweep entry, ascending (each part parsed in its kind's units)."""
    kind, sep, raw = text.partition("=")
    parts = raw.split(":")
    if not sep or len(parts) not in (1, 3):
        raise SpecError(f"sweep entry {text[:80]!r}: {_FORM}")
    try:
        first, *rest = (
            parse_budget(f"{kind}={part}", act_bits=act_bits, table_layers=table_layers)
            for part in parts
        )
    except BudgetError as exc:
        raise BudgetError(f"sweep entry {text[:80]!r}: {exc.message}") from exc
    if not rest:
        return [first]
    start, stop, step = first.value, rest[0].value, rest[1].value
    if step <= 0 or stop < start:
        raise SpecError(
            f"sweep entry {text[:80]!r}: the range needs START <= STOP and a positive STEP"
        )
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_SWEEP_POINTS:
        raise SpecError(
            f"sweep entry {text[:80]!r} gives {count} budgets; at most {MAX_SWEEP_POINTS} "
            "points per sweep (use a larger STEP)",
            code="spec_too_large",
        )
    return [replace(first, value=round(start + i * step, 12)) for i in range(count)]


def parse_sweep(
    texts: Sequence[str], *, act_bits: int = 8, table_layers: dict[str, Any] | None = None
) -> list[Budget]:
    """The budgets of a sweep: every entry's budgets, in order, repeats dropped.

    Args:
        texts: entries like ``avg-bits=2:8:0.5``, ``size=1MB:4MB:0.5MB`` or ``avg-bits=3``.
        act_bits: activation bits of ``bitops`` budgets.
        table_layers: the cost table of ``table`` budgets (a spec's ``cost_table``).

    Raises:
        SpecError: a malformed entry or range; ``spec_too_large`` beyond
            :data:`MAX_SWEEP_POINTS` budgets. BudgetError (a SpecError) for a bad value.

    Example:
        >>> [b.value for b in parse_sweep(["avg-bits=2:4:0.5"])]
        [2.0, 2.5, 3.0, 3.5, 4.0]
    """
    budgets: list[Budget] = []
    for text in texts:
        if not isinstance(text, str):
            raise SpecError(f"sweep entries must be strings; {_FORM}", code="spec_type")
        for budget in _entry(text, act_bits, table_layers):
            if budget not in budgets:
                budgets.append(budget)
        if len(budgets) > MAX_SWEEP_POINTS:
            raise SpecError(
                f"the sweep asks for {len(budgets)} budgets; at most {MAX_SWEEP_POINTS}",
                code="spec_too_large",
            )
    return budgets


@dataclass
class PlannedPoint:
    """One point of a sweep before it is measured: its series, budget and allocation."""

    series: str  # "mixed" or "uniform"
    label: str
    allocation: Allocation
    budget: Budget | None = None  # None for a uniform point
    uniform_bits: int | None = None


def plan_mixed(
    table: SensitivityTable,
    budgets: Sequence[Budget],
    *,
    bits: Sequence[int] | None = None,
    pins: dict[str, int] | None = None,
    ties: Sequence[str] = (),
    solver: str = "auto",
    file_bytes: FileBytes | None = None,
) -> tuple[list[PlannedPoint], list[dict[str, str]]]:
    """The allocation of each budget alone (with the job's candidate bits, pins, ties and
    solver; size budgets held on the written file with ``file_bytes``), and the budgets that
    cannot be met, each with the reason."""
    from mpq_core.allocation import allocate_bits

    points: list[PlannedPoint] = []
    skipped: list[dict[str, str]] = []
    for budget in budgets:
        try:
            alloc = allocate_bits(
                table,
                [budget],
                bits=bits,
                pins=pins,
                ties=ties,
                solver=solver,
                file_bytes=file_bytes,
            )
        except BudgetInfeasible as exc:
            skipped.append({"label": budget.label(), "reason": exc.message})
            continue
        points.append(PlannedPoint("mixed", budget.label(), alloc, budget=budget))
    return points, skipped


def plan_uniform(
    table: SensitivityTable, bits: Sequence[int], *, solver: str = "auto"
) -> list[PlannedPoint]:
    """Every layer at the same width, for each candidate width (the reference curve); the
    user's pins do not apply here."""
    from mpq_core.allocation import allocate_bits

    cand = sorted({int(b) for b in bits})
    roomy = Budget("avg-bits", float(max(cand)))  # every uniform choice fits it
    return [
        PlannedPoint(
            "uniform",
            f"uniform {b} bits",
            allocate_bits(table, [roomy], bits=cand, pins={".*": b}, solver=solver),
            uniform_bits=b,
        )
        for b in cand
    ]


def predicted_size(table: SensitivityTable, bits: Sequence[int]) -> tuple[float, float]:
    """``(bytes, average bits)`` an allocation reaches: the packed size the allocation reports
    for a ``size`` budget (quantized layers packed plus every float parameter) and the
    parameter-weighted mean width."""

    def reach(kind: str) -> float:
        return achieved(
            Budget(kind, 1.0),
            table.layers,
            table.float_params,
            bits,
            model_bytes=table.model_bytes,
            float_bytes=table.float_bytes,
            scheme=table.scheme,
        )

    size, avg = reach("size"), reach("avg-bits")
    return size, avg


def _num(value: Any) -> float | None:
    """A JSON number, or None for an absent or non-finite one."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class CurvePoint:
    """One measured point of the trade-off curve.

    Attributes:
        series: ``mixed`` (the sensitivity method's allocation), ``uniform`` or ``chosen``.
        label: the budget as written (``avg-bits=3 bits``) or ``uniform 4 bits``.
        bits: the width of each layer, in the curve's layer order.
        size_bytes: the packed size the allocation reports (codes, scales and float
            parameters, as the cost model counts them).
        file_bytes: the packed checkpoint as it would be written, header included (what a
            ``size`` budget holds on); None where it was not measured.
        avg_bits: the parameter-weighted mean width.
        predicted_loss_increase: the table's prediction (sum of the chosen Omega entries).
        predicted_metric_loss_increase: the same in the unit of the measured rise.
        measured_loss_increase: quantized minus float loss on the evaluation data, no
            fine-tuning.
        metrics: the quantized model's metrics on the evaluation data.
        budget: the budget (kind, value), None for a uniform point.
        uniform_bits: the width of a uniform point.
        chosen: the job's own allocation.
    """

    series: str
    label: str
    bits: list[int]
    size_bytes: float
    avg_bits: float
    predicted_loss_increase: float
    predicted_metric_loss_increase: float | None
    measured_loss_increase: float | None
    metrics: dict[str, Any]
    budget: Budget | None = None
    uniform_bits: int | None = None
    chosen: bool = False
    file_bytes: int | None = None

    def metric(self, name: str) -> float | None:
        return _num(self.metrics.get(name))

    @property
    def checkpoint_bytes(self) -> float:
        """The packed checkpoint's size: as written where measured, else the cost model's."""
        return float(self.file_bytes) if self.file_bytes is not None else self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        budget = None
        if self.budget is not None:
            budget = {
                "kind": self.budget.kind,
                "value": self.budget.value,
                "label": self.budget.label(),
            }
        return {
            "series": self.series,
            "label": self.label,
            "budget": budget,
            "uniform_bits": self.uniform_bits,
            "chosen": self.chosen,
            "size_bytes": self.size_bytes,
            "file_bytes": self.file_bytes,
            "avg_bits": self.avg_bits,
            "predicted_loss_increase": _num(self.predicted_loss_increase),
            "predicted_metric_loss_increase": _num(self.predicted_metric_loss_increase),
            "measured_loss_increase": _num(self.measured_loss_increase),
            "metrics": {
                k: v if not isinstance(v, float) else _num(v) for k, v in self.metrics.items()
            },
            "bits": list(self.bits),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurvePoint:
        b = d.get("budget")
        return cls(
            series=str(d["series"]),
            label=str(d["label"]),
            bits=[int(x) for x in d["bits"]],
            size_bytes=float(d["size_bytes"]),
            avg_bits=float(d["avg_bits"]),
            predicted_loss_increase=float(d["predicted_loss_increase"] or 0.0),
            predicted_metric_loss_increase=_num(d.get("predicted_metric_loss_increase")),
            measured_loss_increase=_num(d.get("measured_loss_increase")),
            metrics=dict(d.get("metrics") or {}),
            budget=None if b is None else Budget(str(b["kind"]), float(b["value"])),
            uniform_bits=None if d.get("uniform_bits") is None else int(d["uniform_bits"]),
            chosen=bool(d.get("chosen", False)),
            file_bytes=None if d.get("file_bytes") is None else int(d["file_bytes"]),
        )


@dataclass
class Curve:
    """The trade-off curve of one model: measured points of the method's allocations over a
    range of budgets, uniform allocations as the reference, and the job's own point.

    Attributes:
        method: the sensitivity method (``fisher``, ``kl``, ``hawq``), the mixed series' name.
        metric: the metric the curve plots beside the loss rise (``accuracy`` with labels,
            else ``sqnr_db``).
        loss_unit: what the loss rises are measured per (as in ``report.json``).
        layers: the layer names, the order of every point's ``bits``.
        params: each layer's parameter count.
        float_metrics: the float model's metrics on the evaluation data.
        model_bytes: the model's own size (the ``compression`` baseline).
        mixed, uniform: the points of each series.
        chosen: the job's own allocation, measured the same way (None without one).
        skipped: sweep budgets that cannot be met, with the reason.
        eval_samples: samples the points were measured on.
        seconds: wall time of the sweep.
    """

    method: str
    metric: str
    loss_unit: str
    layers: list[str]
    params: list[int]
    float_metrics: dict[str, Any]
    model_bytes: float
    mixed: list[CurvePoint] = field(default_factory=list)
    uniform: list[CurvePoint] = field(default_factory=list)
    chosen: CurvePoint | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    eval_samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": CURVE_SCHEMA_VERSION,
            "kind": "mpq.curve",
            "method": self.method,
            "metric": self.metric,
            "loss_unit": self.loss_unit,
            "eval_samples": self.eval_samples,
            "seconds": self.seconds,
            "model_bytes": self.model_bytes,
            "float_metrics": {
                k: v if not isinstance(v, float) else _num(v) for k, v in self.float_metrics.items()
            },
            "layers": [
                {"name": n, "params": p} for n, p in zip(self.layers, self.params, strict=True)
            ],
            "points": {
                "mixed": [p.to_dict() for p in self.mixed],
                "uniform": [p.to_dict() for p in self.uniform],
            },
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "skipped": [dict(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Curve:
        if not isinstance(d, dict) or d.get("kind") != "mpq.curve":
            raise SpecError("not an mpq curve (expected kind 'mpq.curve')")
        if int(d.get("schema_version", 0)) > CURVE_SCHEMA_VERSION:
            raise SpecError(
                f"curve schema_version {d.get('schema_version')} is newer than this mpq "
                f"understands ({CURVE_SCHEMA_VERSION}); upgrade mpq"
            )
        try:
            chosen = d.get("chosen")
            return cls(
                method=str(d["method"]),
                metric=str(d["metric"]),
                loss_unit=str(d["loss_unit"]),
                layers=[str(row["name"]) for row in d["layers"]],
                params=[int(row["params"]) for row in d["layers"]],
                float_metrics=dict(d.get("float_metrics") or {}),
                model_bytes=float(d["model_bytes"]),
                mixed=[CurvePoint.from_dict(p) for p in d["points"]["mixed"]],
                uniform=[CurvePoint.from_dict(p) for p in d["points"]["uniform"]],
                chosen=None if chosen is None else CurvePoint.from_dict(chosen),
                skipped=[dict(s) for s in d.get("skipped", [])],
                eval_samples=int(d.get("eval_samples", 0)),
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed curve: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read curve {path}: {exc}") from exc
        return cls.from_dict(data)


def write_curve(curve: Curve, out_dir: str | Path) -> Path:
    """Write ``curve.json`` (strict JSON: non-finite numbers become null) into ``out_dir``."""
    path = Path(out_dir) / CURVE_NAME
    path.write_text(json.dumps(curve.to_dict(), indent=2, allow_nan=False) + "\n")
    return path
