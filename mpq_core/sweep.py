"""The trade-off curve, measured: one sensitivity table, many budgets, each allocation quantized
post-training (no fine-tuning) and evaluated, beside uniform allocations as the reference.

Re-solving a table takes milliseconds; what a point costs is quantizing the weights once and
two forward passes over the evaluation data (:meth:`Evaluator.compare`: the float model's
outputs are recomputed batch by batch beside the quantized ones). Allocations that repeat (two
budgets that give the same bits, a budget that gives a uniform allocation) are measured once.

Memory: the float values of the quantized layers (a copy the job holds anyway) and one
quantized model at a time: each point's weights are written into the model's own parameters (so
activation quantization, which finds layers by storage, still finds them), evaluated, and the
float values copied back before the next point. :func:`sweep` leaves the model holding its float
weights bit for bit; the job's :func:`sweep_stage` puts its own quantized weights back.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mpq_core.allocation import Allocation, FileBytes, allocate
from mpq_core.archive_guard import DEFAULT_LIMITS, ArchiveLimits
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.evaluate import Comparison, Evaluator, Metrics
from mpq_core.intake import LoadedModel
from mpq_core.layers import transposed_names
from mpq_core.packed_checkpoint import file_bytes_of
from mpq_core.pipeline import (
    DataSource,
    ModelSource,
    analyze_stage,
    plan_stage,
    prepare_job,
)
from mpq_core.profiling import profile_model
from mpq_core.progress import ProgressFn, StageClock, counted, null_progress
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.report import metric_units
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import JobSpec
from mpq_core.sweep_plan import (
    Curve,
    CurvePoint,
    PlannedPoint,
    plan_mixed,
    plan_uniform,
    predicted_size,
    write_curve,
)
from mpq_core.weight_sets import WeightSet, copy_weights, load_weights

if TYPE_CHECKING:
    from mpq_core.pipeline import JobContext, Quantization

__all__ = [
    "SweepResult",
    "chosen_point",
    "measure_point",
    "metric_name",
    "run_sweep",
    "sweep",
    "sweep_stage",
    "write_sweep",
]


def metric_name(float_metrics: Metrics) -> str:
    """The metric a curve plots beside the loss rise: accuracy with labels, else the SQNR."""
    return "accuracy" if float_metrics.accuracy is not None else "sqnr_db"


def measure_point(
    model: LoadedModel,
    test: CalibrationData,
    float_weights: WeightSet,
    bits: dict[str, int],
    *,
    evaluator: Evaluator,
    scheme: QuantScheme,
    transposed: Collection[str] = (),
) -> Comparison:
    """Quantize the model (holding ``float_weights`` in its quantized layers) at ``bits``,
    score it against the float model on ``test``, and copy the float weights back (also on
    error)."""
    layers = quantize_weights(model, bits, scheme=scheme, transposed=transposed)
    try:
        apply_weights(model, layers)
        del layers  # only the model's copy of the quantized weights stays
        return evaluator.compare(model, test, float_weights)
    finally:
        load_weights(model, float_weights)


def _point(
    planned: PlannedPoint,
    table: SensitivityTable,
    spec: JobSpec,
    comparison: Comparison,
    file_bytes: FileBytes,
) -> CurvePoint:
    """A measured point from its plan and its comparison with the float model."""
    alloc = planned.allocation
    bits = [la.bits for la in alloc.layers]
    size, avg = predicted_size(table, bits)
    predicted = alloc.predicted_loss_increase
    comparable, _ = metric_units(predicted, comparison.output_shape, spec)
    q, f = comparison.quantized_metrics, comparison.float_metrics
    return CurvePoint(
        series=planned.series,
        label=planned.label,
        bits=bits,
        size_bytes=size,
        avg_bits=avg,
        predicted_loss_increase=predicted,
        predicted_metric_loss_increase=comparable,
        measured_loss_increase=q.loss - f.loss,
        metrics=q.to_dict(),
        budget=planned.budget,
        uniform_bits=planned.uniform_bits,
        file_bytes=file_bytes(alloc.bits_by_layer()),
    )


def chosen_point(
    allocation: Allocation,
    table: SensitivityTable,
    spec: JobSpec,
    comparison: Comparison,
    file_bytes: FileBytes,
) -> CurvePoint:
    """The job's own allocation as a point of the curve, marked ``chosen``."""
    label = ", ".join(rep.budget.label() for rep in allocation.budgets)
    planned = PlannedPoint("chosen", label, allocation)
    return replace(_point(planned, table, spec, comparison, file_bytes), chosen=True)


@dataclass
class _Measured:
    """What :func:`sweep` needs to measure a point: the model, data and evaluation settings."""

    model: LoadedModel
    test: CalibrationData
    float_weights: WeightSet
    evaluator: Evaluator
    scheme: QuantScheme
    transposed: Collection[str]

    def __call__(self, bits: dict[str, int]) -> Comparison:
        return measure_point(
            self.model,
            self.test,
            self.float_weights,
            bits,
            evaluator=self.evaluator,
            scheme=self.scheme,
            transposed=self.transposed,
        )


def _plans(
    table: SensitivityTable, spec: JobSpec, size_of: FileBytes
) -> tuple[list[PlannedPoint], list[dict[str, str]]]:
    """The sweep's budgets (held on the written checkpoint) and the uniform widths, and the
    budgets that cannot be met."""
    solver = spec.solver.value
    mixed, skipped = plan_mixed(
        table,
        spec.parsed_sweep(),
        bits=spec.bits,
        pins=spec.pins,
        ties=spec.ties,
        solver=solver,
        file_bytes=size_of,
    )
    return mixed + plan_uniform(table, spec.bits, solver=solver), skipped


def sweep(
    model: LoadedModel,
    table: SensitivityTable,
    test: CalibrationData,
    spec: JobSpec,
    *,
    float_weights: WeightSet | None = None,
    evaluator: Evaluator | None = None,
    chosen: Allocation | CurvePoint | None = None,
    progress: ProgressFn | None = None,
) -> Curve:
    """Measure the trade-off curve of ``spec.sweep``'s budgets and of every uniform width.

    Args:
        model: the model; its quantized layers hold their float weights (and again on return).
        table: the sensitivity table, for this model (from the job or given).
        test: the evaluation data.
        spec: the sweep's budgets (``spec.sweep``), candidate bits, pins, ties, solver,
            quantizer scheme and analysis loss (the unit of predicted rises).
        float_weights: the float values of the quantized layers (copied from the model when
            None).
        evaluator: batch size, output key, activation quantizer (``spec``'s when None).
        chosen: the job's own allocation (measured here), or its point already measured.
        progress: ``progress("sweep", fraction, {"point": label})`` after each point.

    Example:
        >>> curve = sweep(model, table, test, JobSpec(budgets=["avg-bits=4"],  # doctest: +SKIP
        ...               sweep=["avg-bits=2:8:1"]))
        >>> [(p.avg_bits, p.measured_loss_increase) for p in curve.mixed]  # doctest: +SKIP
    """
    start = time.perf_counter()
    report = progress or null_progress
    names = table.names
    if float_weights is None:
        float_weights = copy_weights(model, names)
    measure = _Measured(
        model,
        test,
        {n: float_weights[n] for n in names},
        evaluator or Evaluator(batch_size=spec.batch_size, output_key=spec.output_key),
        spec.scheme,
        transposed_names(table.layers),
    )
    size_of = file_bytes_of(model, spec.scheme, measure.transposed)
    plans, skipped = _plans(table, spec, size_of)
    if isinstance(chosen, Allocation):
        plans.append(PlannedPoint("chosen", "", chosen))
    seen: dict[tuple[int, ...], Comparison] = {}
    points: list[CurvePoint] = []
    for i, planned in enumerate(plans):
        bits = planned.allocation.bits_by_layer()
        key = tuple(bits[n] for n in names)
        if key not in seen:
            seen[key] = measure(bits)
        if planned.series == "chosen":
            assert isinstance(chosen, Allocation)
            chosen = chosen_point(chosen, table, spec, seen[key], size_of)
        else:
            points.append(_point(planned, table, spec, seen[key], size_of))
        report(
            "sweep", (i + 1) / len(plans), counted(i + 1, len(plans), "points", point=planned.label)
        )
    first = next(iter(seen.values()))
    _, unit = metric_units(0.0, first.output_shape, spec)
    return Curve(
        method=table.method,
        metric=metric_name(first.float_metrics),
        loss_unit=unit,
        layers=names,
        params=[layer.params for layer in table.layers],
        float_metrics=first.float_metrics.to_dict(),
        model_bytes=_model_bytes(table),
        mixed=[p for p in points if p.series == "mixed"],
        uniform=[p for p in points if p.series == "uniform"],
        chosen=chosen if isinstance(chosen, CurvePoint) else None,
        skipped=skipped,
        eval_samples=test.num_samples,
        seconds=round(time.perf_counter() - start, 4),
    )


def _model_bytes(table: SensitivityTable) -> float:
    """The model's own size (float32 where the table did not record it)."""
    params = sum(layer.params for layer in table.layers) + table.float_params
    return float(table.model_bytes or 4 * params)


def sweep_stage(
    ctx: JobContext, table: SensitivityTable, allocation: Allocation, quant: Quantization
) -> Curve:
    """The job's ``sweep`` stage (when its spec asks for one), between quantization and
    fine-tuning: the curve on the job's evaluation data, its own allocation the chosen point
    (the scores the quantize stage measured). The model holds the job's quantized weights again
    afterwards, bit for bit."""
    float_weights = {name: quant.float_weights[name] for name in quant.layers}
    scores = quant.scores
    own = Comparison(scores.float_eval, scores.quantized_eval, scores.output_shape)
    load_weights(ctx.model, float_weights)
    try:
        curve = sweep(
            ctx.model,
            table,
            ctx.test,
            ctx.spec,
            float_weights=float_weights,
            evaluator=ctx.evaluator,
            chosen=chosen_point(
                allocation,
                table,
                ctx.spec,
                own,
                file_bytes_of(ctx.model, ctx.spec.scheme, transposed_names(table.layers)),
            ),
            progress=ctx.clock.forward("sweep"),
        )
    finally:
        apply_weights(ctx.model, quant.layers)
    for skip in curve.skipped:
        ctx.notes.append(f"sweep: {skip['reason']}")
    return curve


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced: the curve, the table it came from and the allocation
    of the spec's own budgets (None when none was asked to be marked)."""

    curve: Curve
    sensitivity: SensitivityTable
    allocation: Allocation | None
    notes: list[str]


def run_sweep(
    spec: JobSpec,
    model: ModelSource,
    data: DataSource,
    *,
    eval_data: DataSource | None = None,
    sensitivity: SensitivityTable | None = None,
    mark_budgets: bool = True,
    progress: ProgressFn | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> SweepResult:
    """A sweep without the rest of the job (``mpq sweep``): intake, profiling and analysis as a
    job does them (or the given table, checked), then :func:`sweep` on the evaluation data.

    Args:
        spec: the sweep (``spec.sweep``) and everything that decides the table and allocations.
        model, data, eval_data, sensitivity, limits: as for :func:`mpq_core.pipeline.run`.
        mark_budgets: also measure ``spec.budgets``' allocation as the chosen point.
        progress: ``progress(stage, fraction, metrics)`` for intake, profile, analyze, sweep.
    """
    if not spec.sweep:
        raise SpecError("no sweep asked: give sweep budgets, e.g. --sweep avg-bits=2:8:0.5")
    clock = StageClock(progress or null_progress)
    with clock.stage("intake"):
        ctx = prepare_job(spec, model, data, eval_data, clock, limits)
    with clock.stage("profile"):
        plan_stage(ctx)
        profile = profile_model(ctx.model, ctx.work, batch_size=ctx.batch_size)
    with clock.stage("analyze"):
        table = analyze_stage(ctx, profile, sensitivity)
    held_to = file_bytes_of(ctx.model, spec.scheme, transposed_names(table.layers))
    allocation = allocate(table, spec, file_bytes=held_to) if mark_budgets else None
    with clock.stage("sweep"):
        curve = sweep(
            ctx.model,
            table,
            ctx.test,
            spec,
            evaluator=ctx.evaluator,
            chosen=allocation,
            progress=clock.forward("sweep"),
        )
    notes = ctx.notes + [f"sweep: {skip['reason']}" for skip in curve.skipped]
    return SweepResult(curve, table, allocation, notes)


def write_sweep(result: SweepResult, out_dir: str | Path) -> dict[str, Path]:
    """``curve.json``, ``sensitivity.json`` and the plots of a sweep, into ``out_dir``."""
    from mpq_core.plots import write_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"curve.json": write_curve(result.curve, out)}
    files["sensitivity.json"] = out / "sensitivity.json"
    result.sensitivity.save(files["sensitivity.json"])
    files.update(
        write_plots(
            out,
            allocation=result.allocation,
            sensitivity=result.sensitivity,
            curve=result.curve,
            notes=result.notes,
        )
    )
    return files
