"""The whole job: intake, profiling, sensitivities, allocation, quantization, fine-tuning,
evaluation and export, with one progress callback and a time per stage.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpq_core.actquant import ActEncoding, ActivationQuantizer, calibrate_activations
from mpq_core.allocation import Allocation, allocate_bits
from mpq_core.budgets import Budget, achieved
from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData, load_data
from mpq_core.dropin_model import save_quantized_model
from mpq_core.errors import SpecError
from mpq_core.evaluate import Metrics, evaluate, model_outputs
from mpq_core.finetune import FinetuneResult, finetune, split_holdout
from mpq_core.intake import LoadedModel, load_model
from mpq_core.packed_checkpoint import save_packed_checkpoint
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.progress import ProgressFn, null_progress
from mpq_core.quantized_weights import apply_weights, quantize_weights
from mpq_core.runner import check_data_fits
from mpq_core.sensitivity import compute_sensitivity
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import JobSpec

__all__ = ["STAGES", "PipelineResult", "quantize_model"]

SCHEMA_VERSION = 1
STAGES = ("intake", "profile", "analyze", "allocate", "quantize", "finetune", "evaluate", "export")


@dataclass
class PipelineResult:
    """What a job produced: its files and the report written to ``report.json``."""

    out_dir: Path
    allocation: Allocation
    sensitivity: SensitivityTable
    report: dict[str, Any]
    artifacts: dict[str, Path] = field(default_factory=dict)


class _Stages:
    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(name, 0.0, {})
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)
        self.progress(name, 1.0, {})

    def forward(self, stage: str) -> ProgressFn:
        """Re-label a library function's progress reports as this stage's."""

        def report(_: str, fraction: float, metrics: dict[str, Any]) -> None:
            self.progress(stage, min(fraction, 0.999), metrics)

        return report


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


def _finite(value: Any) -> Any:
    """Strict JSON: infinities and NaN (e.g. the SQNR of identical outputs) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n")
    return path


def quantize_model(
    model_source: str | Path | bytes,
    data_source: str | Path | bytes | CalibrationData,
    spec: JobSpec,
    out_dir: str | Path,
    *,
    eval_source: str | Path | bytes | CalibrationData | None = None,
    sensitivity: SensitivityTable | None = None,
    progress: ProgressFn | None = None,
) -> PipelineResult:
    """Run a quantization job end to end and write its artefacts into ``out_dir``.

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

    Example:
        >>> spec = JobSpec(budgets=["avg-bits=3"])
        >>> quantize_model("model.pt", "calib.npz", spec, "out/")  # doctest: +SKIP
    """
    stages = _Stages(progress or null_progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budgets: list[Budget] = spec.parsed_budgets()
    key = spec.output_key

    with stages.stage("intake"):
        model = load_model(model_source)
        data = data_source if isinstance(data_source, CalibrationData) else load_data(data_source)
        check_data_fits(model, data)
        if eval_source is not None:
            test = (
                eval_source if isinstance(eval_source, CalibrationData) else load_data(eval_source)
            )
            check_data_fits(model, test)
            work, eval_from = data, "eval data"
        elif spec.eval_fraction > 0 and data.num_samples >= 2:
            work, test = split_holdout(data, spec.eval_fraction, spec.seed)
            eval_from = f"held-out {spec.eval_fraction:.0%} of the data"
        else:
            work, test, eval_from = data, data, "the calibration data itself (nothing held out)"

        device = resolve_device(spec.device)
        device_note = None
        if device.type != "cpu":
            device_note = _move_if_it_runs(model, work, device)
            if device_note is None:
                data, work, test = (_on(d, device) for d in (data, work, test))
            else:
                device = torch.device("cpu")

    with stages.stage("profile"):
        profile = profile_model(model, work, batch_size=spec.batch_size)

    with stages.stage("analyze"):
        if sensitivity is not None:
            _check_table(sensitivity, model, profile, spec)
            table = sensitivity
        else:
            analysis = spec.analysis
            options: dict[str, Any] = {"batch_size": spec.batch_size, "loss": analysis.loss}
            if analysis.method == "hawq":
                options.update(iterations=analysis.hawq_iterations, seed=spec.seed)
            if analysis.first_order:
                options["first_order"] = True
            table = compute_sensitivity(
                analysis.method,
                model,
                work,
                profile,
                spec.bits,
                progress=stages.forward("analyze"),
                **options,
            )

    with stages.stage("allocate"):
        allocation = allocate_bits(
            table, budgets, bits=spec.bits, pins=spec.pins, ties=spec.ties, solver=spec.solver
        )
        bits = allocation.bits_by_layer()

    with stages.stage("quantize"):
        float_weights = {n: p.detach().clone() for n, p in model.named_weights().items()}
        reference = model_outputs(model, test, batch_size=spec.batch_size, output_key=key)
        calib_reference = model_outputs(model, work, batch_size=spec.batch_size, output_key=key)
        float_metrics = evaluate(model, test, reference, batch_size=spec.batch_size, output_key=key)
        float_calib = evaluate(
            model, work, calib_reference, batch_size=spec.batch_size, output_key=key
        )
        layers = quantize_weights(model, bits)
        scales = {n: layer.scales for n, layer in layers.items()}
        apply_weights(model, layers)
        encodings: dict[str, ActEncoding] = {}
        act_quant = None
        if spec.quantize_activations:
            encodings = calibrate_activations(
                model, work, list(bits), spec.act_bits, batch_size=spec.batch_size
            )
            act_quant = ActivationQuantizer(model.named_weights(), encodings)
        ptq_metrics = evaluate(
            model, test, reference, batch_size=spec.batch_size, output_key=key, act_quant=act_quant
        )
        ptq_calib = evaluate(
            model,
            work,
            calib_reference,
            batch_size=spec.batch_size,
            output_key=key,
            act_quant=act_quant,
        )

    tuned: FinetuneResult | None = None
    with stages.stage("finetune"):
        if spec.finetunes:
            _restore(model, float_weights)
            tuned = finetune(
                model,
                work,
                bits,
                scales,
                spec.finetune,
                seed=spec.seed,
                act_quant=act_quant,
                output_key=key,
                progress=stages.forward("finetune"),
            )
            layers = quantize_weights(model, bits, scales=scales)

    with stages.stage("evaluate"):
        final_metrics: Metrics = (
            evaluate(
                model,
                test,
                reference,
                batch_size=spec.batch_size,
                output_key=key,
                act_quant=act_quant,
            )
            if tuned is not None
            else ptq_metrics
        )

    with stages.stage("export"):
        # Artefacts hold CPU tensors, whatever device the job ran on.
        model.module.to("cpu")
        artifacts: dict[str, Path] = {}
        quantized_model = out / ("model" + model.suffix)
        save_quantized_model(model, layers, quantized_model)
        artifacts[quantized_model.name] = quantized_model
        packed = out / "model.mpq.safetensors"
        packed_bytes = save_packed_checkpoint(
            packed, model, layers, metadata={"model_sha256": model.sha256, "format": model.format}
        )
        artifacts[packed.name] = packed
        artifacts["allocation.json"] = allocation_path = out / "allocation.json"
        allocation.save(allocation_path)
        artifacts["sensitivity.json"] = sensitivity_path = out / "sensitivity.json"
        table.save(sensitivity_path)
        if encodings:
            doc = {
                "schema_version": SCHEMA_VERSION,
                "kind": "mpq.encodings",
                "activation_encodings": {name: enc.to_dict() for name, enc in encodings.items()},
                "param_encodings": {
                    name: {"bits": layer.bits, "symmetric": True, "per_channel": True}
                    for name, layer in layers.items()
                },
            }
            artifacts["encodings.json"] = _write_json(out / "encodings.json", doc)

    layer_infos = profile.layers
    predicted_bytes = achieved(
        Budget("size", 1.0),
        layer_infos,
        profile.float_params,
        [bits[layer.name] for layer in layer_infos],
    )
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "mpq.report",
        "model": {
            "format": model.format,
            "sha256": model.sha256,
            "params": profile.total_params,
            "quantized_params": profile.quantized_params,
            "float_params": profile.float_params,
            "layers": len(layer_infos),
        },
        "data": {
            "calibration_samples": work.num_samples,
            "eval_samples": test.num_samples,
            "eval_from": eval_from,
            "labels": data.labels is not None,
        },
        "spec": spec.to_dict(),
        "budgets": [rep.to_dict() for rep in allocation.budgets],
        "allocation": {name: b for name, b in bits.items()},
        "predicted_loss_increase": allocation.predicted_loss_increase,
        "measured_loss_increase": {
            "calibration": ptq_calib.loss - float_calib.loss,
            "eval": ptq_metrics.loss - float_metrics.loss,
        },
        "metrics": {
            "float": float_metrics.to_dict(),
            "quantized": ptq_metrics.to_dict(),
            "finetuned": final_metrics.to_dict() if tuned is not None else None,
        },
        "finetune": tuned.to_dict() if tuned is not None else None,
        "sizes": {
            "float32_bytes": 4 * profile.total_params,
            "predicted_bytes": predicted_bytes,
            "packed_checkpoint_bytes": packed_bytes,
        },
        "timings": dict(stages.seconds),
        "device": str(device),
        "device_note": device_note,
        "artifacts": sorted([*artifacts, "report.json"]),
    }
    report = _finite(report)
    artifacts["report.json"] = _write_json(out / "report.json", report)
    return PipelineResult(
        out_dir=out, allocation=allocation, sensitivity=table, report=report, artifacts=artifacts
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device 'cuda' was asked for but no CUDA device is available")
    return device


def _move_if_it_runs(model: LoadedModel, data: CalibrationData, device: torch.device) -> str | None:
    """Move the model to ``device`` if a probe batch runs there; else leave it on the CPU and
    say why. A torch.export program traced on the CPU can hold stride-dependent views that
    fail on CUDA (seen with attention), so the job runs on the CPU instead of failing."""
    model.module.to(device)
    probe = _on(data.subset(slice(0, 2)), device)
    try:
        with capture_context(grad=False):  # the path the job itself takes
            model(*probe.inputs)
    except RuntimeError as exc:
        model.module.to("cpu")
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return f"the model does not run on {device} ({first}); ran on cpu"
    return None


def _on(data: CalibrationData, device: torch.device) -> CalibrationData:
    labels = data.labels.to(device) if data.labels is not None else None
    return CalibrationData([t.to(device) for t in data.inputs], labels)


def _restore(model: LoadedModel, weights: dict[str, torch.Tensor]) -> None:
    params = model.named_weights()
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
