"""The whole job as stages: intake, profiling, sensitivities, allocation, quantization,
fine-tuning and evaluation around one :class:`JobContext`, each stage returning a typed result,
with one progress callback and a time per stage.

:func:`run` does the job in memory and returns a :class:`JobResult` (the quantized model, the
allocation, the sensitivity table, metrics, encodings and the report);
:func:`mpq_core.artifacts.write_artifacts` writes it out; :func:`quantize_model` does both.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpq_core.actquant import ActEncoding, ActivationQuantizer, calibrate_activations
from mpq_core.allocation import Allocation, allocate, checkpoint_overhead
from mpq_core.archive_guard import DEFAULT_LIMITS, ArchiveLimits
from mpq_core.artifacts import write_artifacts
from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData, load_data
from mpq_core.errors import SpecError
from mpq_core.evaluate import Evaluator, Metrics
from mpq_core.finetune import FinetuneResult, finetune, split_holdout
from mpq_core.intake import LoadedModel, load_model
from mpq_core.layers import transposed_names
from mpq_core.memory_plan import (
    MemoryPlan,
    peak_resident_and_reset,
    plan_memory,
    release_free_memory,
)
from mpq_core.packed_checkpoint import file_bytes_of
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.progress import STAGES, ProgressFn, StageClock, null_progress
from mpq_core.quantized_weights import QuantizedLayer, apply_weights, quantize_weights
from mpq_core.report import build_report
from mpq_core.runner import (
    MODEL_ERRORS,
    check_data_fits,
    check_finetune_samples,
    error_summary,
    iter_batches,
)
from mpq_core.sensitivity import analyze
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import JobSpec
from mpq_core.weight_sets import copy_weights, load_weights

if TYPE_CHECKING:
    from mpq_core.sweep_plan import Curve

__all__ = [
    "STAGES",
    "JobContext",
    "JobResult",
    "PipelineResult",
    "quantize_model",
    "resolve_device",
    "run",
]


ModelSource = LoadedModel | str | Path | bytes
DataSource = CalibrationData | str | Path | bytes


@dataclass
class JobContext:
    """One job as its stages see it: the spec, the loaded model, the data splits and where
    they run."""

    spec: JobSpec
    model: LoadedModel
    data: CalibrationData  # everything given as calibration data
    work: CalibrationData  # what analysis, calibration and fine-tuning use
    test: CalibrationData  # what the metrics are measured on
    eval_from: str
    device: torch.device
    device_note: str | None
    clock: StageClock
    evaluator: Evaluator
    notes: list[str] = field(default_factory=list)  # what the user should know, in report.json
    plan: MemoryPlan | None = None  # the batch sizes that fit the memory budget
    stage_peaks: dict[str, int] = field(default_factory=dict)  # peak resident bytes by stage

    @property
    def batch_size(self) -> int:
        """Samples per pass in profiling, analysis, calibration and evaluation."""
        return self.plan.batch_size if self.plan is not None else self.spec.batch_size


@dataclass
class Scores:
    """Metrics of the float and the quantized model, on the evaluation and calibration data."""

    output_shape: tuple[int, ...]  # one sample's scored output, e.g. (T, C) for a language model
    float_eval: Metrics
    float_calib: Metrics
    quantized_eval: Metrics
    quantized_calib: Metrics


@dataclass
class Quantization:
    """The quantize stage's result: the model holds the quantized weights."""

    layers: dict[str, QuantizedLayer]
    float_weights: dict[str, torch.Tensor]
    encodings: dict[str, ActEncoding]
    act_quant: ActivationQuantizer | None
    scores: Scores

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        return {name: layer.scales for name, layer in self.layers.items()}

    @property
    def zeros(self) -> dict[str, torch.Tensor | None]:
        return {name: layer.zeros for name, layer in self.layers.items()}


@dataclass
class JobResult:
    """What :func:`run` produced, in memory. ``model`` holds the quantized weights (dequantized),
    ``layers`` the integer codes and scales, ``report`` what ``report.json`` holds (its export
    timing, packed size and artefact list are filled in by ``write_artifacts``)."""

    model: LoadedModel
    allocation: Allocation
    sensitivity: SensitivityTable
    profile: ModelProfile
    layers: dict[str, QuantizedLayer]
    metrics: dict[str, Metrics | None]  # "float", "quantized", "finetuned"
    encodings: dict[str, ActEncoding]
    finetune: FinetuneResult | None
    report: dict[str, Any]
    # One batch of inputs (CPU), to record the runtime exports with and check them on.
    example_inputs: list[torch.Tensor] = field(default_factory=list)
    curve: Curve | None = None  # the trade-off curve, when the spec asks for a sweep


@dataclass
class PipelineResult:
    """What a job produced: its files and the report written to ``report.json``."""

    out_dir: Path
    allocation: Allocation
    sensitivity: SensitivityTable
    report: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)
    curve: Curve | None = None


def run(
    spec: JobSpec,
    model: ModelSource,
    data: DataSource,
    *,
    eval_data: DataSource | None = None,
    sensitivity: SensitivityTable | None = None,
    progress: ProgressFn | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> JobResult:
    """Run a quantization job in memory: every stage of ``STAGES`` but ``export``.

    Args:
        spec: the job spec.
        model: a loaded model (quantized in place) or its TorchScript / torch.export source.
        data: calibration data, loaded or its source.
        eval_data: evaluation data; without it ``spec.eval_fraction`` of the data is held out.
        sensitivity: a stored table for this model and data to reuse instead of recomputing.
        progress: ``progress(stage, fraction, metrics)`` for every stage.
        limits: how far uploaded archives may expand (the service derives them from its upload
            limit, :meth:`ArchiveLimits.for_upload_limit`).

    Example:
        >>> result = run(JobSpec(budgets=["avg-bits=3"]), "model.pt", "calib.npz")  # doctest: +SKIP
        >>> result.allocation.bits_by_layer(), result.metrics["finetuned"]  # doctest: +SKIP
    """
    clock = StageClock(progress or null_progress)
    spec.parsed_budgets()  # a bad budget fails before any work
    peaks: dict[str, int] = {}
    peak_resident_and_reset()
    with _measured(clock, "intake", peaks):
        ctx = prepare_job(spec, model, data, eval_data, clock, limits)
    with _measured(clock, "profile", peaks):
        plan_stage(ctx)
        profile = profile_model(ctx.model, ctx.work, batch_size=ctx.batch_size)
    with _measured(clock, "analyze", peaks):
        table = analyze_stage(ctx, profile, sensitivity)
    with _measured(clock, "allocate", peaks):
        transposed = transposed_names(profile.layers)
        # Size budgets hold on the packed checkpoint as written, header included.
        file_bytes = file_bytes_of(ctx.model, spec.scheme, transposed)
        # Kept with the table, so a later re-solve without the model counts the header too.
        table.checkpoint_overhead_bytes = checkpoint_overhead(table, file_bytes)
        allocation = allocate(table, spec, file_bytes=file_bytes)
    with _measured(clock, "quantize", peaks):
        quant = quantize_stage(ctx, allocation.bits_by_layer(), transposed)
    curve = None
    if spec.sweep:  # the trade-off curve, only when asked (mpq_core.sweep)
        from mpq_core.sweep import sweep_stage

        with _measured(clock, "sweep", peaks):
            curve = sweep_stage(ctx, table, allocation, quant)
    with _measured(clock, "finetune", peaks):
        tuned = finetune_stage(ctx, quant)
    with _measured(clock, "evaluate", peaks):
        final = evaluate_stage(ctx, quant, tuned)
    ctx.stage_peaks = peaks
    scores = quant.scores
    metrics = {"float": scores.float_eval, "quantized": scores.quantized_eval, "finetuned": final}
    report = build_report(ctx, profile, allocation, quant, tuned, final)
    example = (
        [t.detach().to("cpu") for t in next(iter_batches(ctx.model, ctx.work, 2)).inputs]
        if spec.runtime_exports
        else []  # write_artifacts then writes no runtime exports
    )
    return JobResult(
        ctx.model,
        allocation,
        table,
        profile,
        quant.layers,
        metrics,
        quant.encodings,
        tuned,
        report,
        example,
        curve,
    )


def quantize_model(
    model_source: str | Path | bytes,
    data_source: str | Path | bytes | CalibrationData,
    spec: JobSpec,
    out_dir: str | Path,
    *,
    eval_source: str | Path | bytes | CalibrationData | None = None,
    sensitivity: SensitivityTable | None = None,
    progress: ProgressFn | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> PipelineResult:
    """Run a quantization job end to end and write its artefacts into ``out_dir``
    (:func:`run`, then :func:`mpq_core.artifacts.write_artifacts`).

    Args:
        model_source: TorchScript archive or torch.export program (path or bytes).
        data_source: calibration data (path, bytes or loaded).
        spec: the job spec.
        out_dir: where ``model.pt``/``model.pt2``, ``model.mpq.safetensors``,
            ``allocation.json``, ``sensitivity.json``, ``report.json`` (and ``encodings.json``
            with activation quantization) are written.
        eval_source: evaluation data; without it ``spec.eval_fraction`` of the data is held out.
        sensitivity: a stored table for this model and data to reuse instead of recomputing.
        progress: ``progress(stage, fraction, metrics)`` for every stage in ``STAGES``.
        limits: how far uploaded archives may expand (see :func:`run`).

    Example:
        >>> spec = JobSpec(budgets=["avg-bits=3"])
        >>> quantize_model("model.pt", "calib.npz", spec, "out/")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run(
        spec,
        model_source,
        data_source,
        eval_data=eval_source,
        sensitivity=sensitivity,
        progress=progress,
        limits=limits,
    )
    artifacts = write_artifacts(result, out, progress=progress)
    return PipelineResult(
        out_dir=out,
        allocation=result.allocation,
        sensitivity=result.sensitivity,
        report=result.report,
        artifacts=artifacts,
        curve=result.curve,
    )


# --- stages --------------------------------------------------------------------------------


@contextmanager
def _measured(clock: StageClock, name: str, peaks: dict[str, int]) -> Iterator[None]:
    """``clock.stage(name)``, then the stage's freed memory handed back to the system (so the
    next stage starts from what is really held) and its peak resident size kept in ``peaks``."""
    with clock.stage(name):
        yield
    release_free_memory()
    peak = peak_resident_and_reset()
    if peak is not None:
        peaks[name] = peak


def prepare_job(
    spec: JobSpec,
    model_source: ModelSource,
    data_source: DataSource,
    eval_source: DataSource | None,
    clock: StageClock,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> JobContext:
    """The ``intake`` stage: load and check model and data (refusing hostile files first,
    :mod:`mpq_core.archive_guard`), split off the evaluation data, choose the device."""
    if isinstance(model_source, LoadedModel):
        model = model_source
    else:
        model = load_model(model_source, limits=limits)
    data = _loaded(data_source, limits)
    check_data_fits(model, data, output_key=spec.output_key)
    if eval_source is not None:
        test = _loaded(eval_source, limits)
        check_data_fits(model, test, output_key=spec.output_key, min_samples=1)
        work, eval_from = data, "eval data"
    elif spec.eval_fraction > 0 and data.num_samples >= 2:
        work, test = split_holdout(data, spec.eval_fraction, spec.seed)
        eval_from = f"held-out {spec.eval_fraction:.0%} of the data"
    else:
        work, test, eval_from = data, data, "the calibration data itself (nothing held out)"
    if spec.finetunes:
        check_finetune_samples(work)

    device = resolve_device(spec.device)
    device_note = None
    if device.type != "cpu":
        device_note = _move_if_it_runs(model, work, device)
        if device_note is None:
            data, work, test = (_on(d, device) for d in (data, work, test))
        else:
            device = torch.device("cpu")
    evaluator = Evaluator(batch_size=spec.batch_size, output_key=spec.output_key)
    ctx = JobContext(
        spec, model, data, work, test, eval_from, device, device_note, clock, evaluator
    )
    if model.fixed_batch == 1 and data.num_samples > 1:
        ctx.notes.append(static_batch_note(data.num_samples))
    return ctx


def plan_stage(ctx: JobContext) -> MemoryPlan:
    """Choose the batch sizes that keep the job within its memory budget (``max_memory``, else
    the machine's), and use them from here on."""
    spec = ctx.spec
    plan = plan_memory(
        ctx.model,
        ctx.work,
        batch_size=spec.batch_size,
        finetune_batch_size=spec.finetune.batch_size if spec.finetunes else None,
        # A step count may span epochs; only a single epoch never copies its best state.
        finetune_keeps_best=spec.finetune.epochs > 1 or spec.finetune.steps is not None,
        bits=len(spec.bits),
        max_memory=spec.memory_budget,
        device=ctx.device,
        output_key=spec.output_key,
    )
    ctx.plan = plan
    ctx.evaluator = replace(ctx.evaluator, batch_size=plan.batch_size)
    if (note := plan.note()) is not None:
        ctx.notes.append(note)
    return plan


def analyze_stage(
    ctx: JobContext, profile: ModelProfile, given: SensitivityTable | None
) -> SensitivityTable:
    """The ``analyze`` stage: the given table once checked against the model, else a new one."""
    if given is not None and _scaled_along_inputs(given):
        ctx.notes.append(
            "the given sensitivity table was computed with scales along the input channels of "
            "weights stored (in, out), as mpq did before; it was computed again"
        )
        given = None
    if given is not None:
        _check_table(given, ctx.model, profile, ctx.spec)
        return given
    return analyze(
        ctx.model,
        ctx.work,
        ctx.spec,
        batch_size=ctx.batch_size,
        profile=profile,
        progress=ctx.clock.forward("analyze"),
    )


def quantize_stage(
    ctx: JobContext, bits: dict[str, int], transposed: Collection[str] = ()
) -> Quantization:
    """The ``quantize`` stage: quantize the weights (and calibrate the activations), then score
    the float and the quantized model batch by batch (:meth:`Evaluator.compare`).
    ``transposed``: the layers stored ``(in, out, ...)`` (``transposed_names(profile.layers)``).
    """
    spec, model = ctx.spec, ctx.model
    float_weights = copy_weights(model)
    layers = quantize_weights(model, bits, scheme=spec.scheme, transposed=transposed)
    apply_weights(model, layers)
    encodings: dict[str, ActEncoding] = {}
    act_quant = None
    if spec.quantize_activations:
        encodings = calibrate_activations(
            model, ctx.work, list(bits), spec.act_bits, batch_size=ctx.batch_size
        )
        act_quant = ActivationQuantizer(model.named_weights(), encodings)
        ctx.evaluator = ctx.evaluator.with_act_quant(act_quant)
    # Only the quantized layers differ from the float model: only they are swapped per batch.
    float_layers = {name: float_weights[name] for name in layers}
    on_eval = ctx.evaluator.compare(model, ctx.test, float_layers)
    on_calib = ctx.evaluator.compare(model, ctx.work, float_layers)
    scores = Scores(
        output_shape=on_eval.output_shape,
        float_eval=on_eval.float_metrics,
        float_calib=on_calib.float_metrics,
        quantized_eval=on_eval.quantized_metrics,
        quantized_calib=on_calib.quantized_metrics,
    )
    return Quantization(layers, float_weights, encodings, act_quant, scores)


def finetune_stage(ctx: JobContext, quant: Quantization) -> FinetuneResult | None:
    """The ``finetune`` stage: fine-tune from the float weights with the allocated bits and
    scales, then re-quantize (``quant.layers`` is updated). None when the spec asks for none."""
    if not ctx.spec.finetunes:
        return None
    load_weights(ctx.model, quant.float_weights)
    bits = {name: layer.bits for name, layer in quant.layers.items()}
    scales = quant.scales
    transposed = {name for name, layer in quant.layers.items() if layer.transposed}
    tuned = finetune(
        ctx.model,
        ctx.work,
        bits,
        scales,
        ctx.spec.finetune,
        seed=ctx.spec.seed,
        act_quant=quant.act_quant,
        output_key=ctx.spec.output_key,
        progress=ctx.clock.forward("finetune"),
        zeros=quant.zeros,
        micro_batch_size=ctx.plan.finetune_batch_size if ctx.plan is not None else None,
        transposed=transposed,
        teacher=quant.float_weights,
    )
    quant.layers = quantize_weights(
        ctx.model,
        bits,
        scales=scales,
        zeros=quant.zeros,
        scheme=ctx.spec.scheme,
        transposed=transposed,
    )
    return tuned


def evaluate_stage(
    ctx: JobContext, quant: Quantization, tuned: FinetuneResult | None
) -> Metrics | None:
    """The ``evaluate`` stage: metrics of the fine-tuned model (None without fine-tuning)."""
    if tuned is None:
        return None
    # Fine-tuning also trained the float parameters (biases, norms): all of them are swapped.
    return ctx.evaluator.compare(ctx.model, ctx.test, quant.float_weights).quantized_metrics


# --- helpers -------------------------------------------------------------------------------


def static_batch_note(samples: int) -> str:
    """Why a program exported with a static batch of 1 is slow, and how to export it instead."""
    return (
        f"the torch.export program takes a static batch of 1, so its {samples} samples run one "
        "at a time (many times slower than batches); export it with a dynamic batch dimension, "
        "e.g. torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim('batch')},))"
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"device {name!r} was asked for but no CUDA device is available; use 'auto' or 'cpu'",
            code="device_unavailable",
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise SpecError(
            f"device {name!r} was asked for but this worker has {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1}); use 'cuda' or 'auto'",
            code="device_unavailable",
        )
    return device


def _loaded(source: DataSource, limits: ArchiveLimits) -> CalibrationData:
    return source if isinstance(source, CalibrationData) else load_data(source, limits=limits)


def _scaled_along_inputs(table: SensitivityTable) -> bool:
    """Whether ``table`` quantized its transposed weights along dim 0 (tables made before
    their scales followed the output channels): its values do not fit this quantizer."""
    transposed = any(layer.transposed for layer in table.layers)
    return transposed and table.meta.get("scales_along") != "output"


def _check_table(
    table: SensitivityTable, model: LoadedModel, profile: ModelProfile, spec: JobSpec
) -> None:
    if table.meta.get("model_sha256") not in (None, model.sha256):
        raise SpecError("the given sensitivity table was computed for another model")
    if table.names != [layer.name for layer in profile.layers]:
        raise SpecError("the given sensitivity table lists other layers than the model has")
    missing = sorted(set(spec.bits) - set(table.bits))
    if missing:
        raise SpecError(f"the given sensitivity table has no values for bits {missing}")
    if table.scheme != spec.scheme:
        raise SpecError(
            f"the given sensitivity table was computed with the quantizer scheme "
            f"{table.scheme.to_dict()}, this job asks for {spec.scheme.to_dict()}"
        )


def _move_if_it_runs(model: LoadedModel, data: CalibrationData, device: torch.device) -> str | None:
    """Move the model to ``device`` if a probe batch runs there; else leave it on the CPU and
    say why. A torch.export program traced on the CPU can hold stride-dependent views that
    fail on CUDA (seen with attention), so the job runs on the CPU instead of failing."""
    model.module.to(device)
    probe = _on(data.subset(slice(0, 2)), device)
    try:
        with capture_context(grad=False):  # the path the job itself takes
            model(*probe.inputs)
    except MODEL_ERRORS as exc:
        model.module.to("cpu")
        first = error_summary(exc, 200)
        return f"the model does not run on {device} ({first}); ran on cpu"
    return None


def _on(data: CalibrationData, device: torch.device) -> CalibrationData:
    labels = data.labels.to(device) if data.labels is not None else None
    return CalibrationData([t.to(device) for t in data.inputs], labels)
