"""``report.json``: what a job asked for and what it achieved, as one JSON document."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq_core.budgets import Budget, achieved
from mpq_core.evaluate import is_class_score_shape
from mpq_core.layers import LayerInfo
from mpq_core.scheme import QuantScheme

if TYPE_CHECKING:
    from mpq_core.allocation import Allocation
    from mpq_core.evaluate import Metrics
    from mpq_core.finetune import FinetuneResult
    from mpq_core.pipeline import JobContext, Quantization
    from mpq_core.profiling import ModelProfile
    from mpq_core.spec import JobSpec

__all__ = ["SCHEMA_VERSION", "build_report", "finite", "write_json"]

SCHEMA_VERSION = 1


def _ratio(measured: float, predicted: float) -> float | None:
    return measured / predicted if predicted > 0 and math.isfinite(measured) else None


def metric_units(
    predicted: float, output_shape: tuple[int, ...], spec: JobSpec
) -> tuple[float, str]:
    """The predicted loss rise in the unit of the measured one, and that unit.

    Omega predicts the rise of each sample's loss *summed* over what it scores: every position
    of a sequence of class scores (cross entropy, or KL to the float model without labels), or,
    for other outputs, half the squared output change summed over the elements. The metrics
    are means per position (per element for mean squared error), so the prediction is divided
    by the positions, or doubled and divided by the elements.

    Args:
        predicted: the allocation's predicted loss increase (Omega's sum).
        output_shape: one sample's scored output, without the batch dimension.
        spec: the job spec (its analysis loss).
    """
    shape = tuple(output_shape)
    elements = max(1, math.prod(shape))
    if spec.analysis.loss != "mse" and is_class_score_shape(shape):
        if len(shape) == 1:
            return predicted, "per sample"
        return predicted / shape[0], f"per position ({shape[0]} per sample)"
    return 2.0 * predicted / elements, f"mean squared error per output element ({elements})"


def build_report(
    ctx: JobContext,
    profile: ModelProfile,
    allocation: Allocation,
    quant: Quantization,
    tuned: FinetuneResult | None,
    final: Metrics | None,
) -> dict[str, Any]:
    """The report of a job run in memory. Its export timing, ``packed_checkpoint_bytes`` and
    ``artifacts`` are filled in when the artefacts are written."""
    model, spec, scores = ctx.model, ctx.spec, quant.scores
    weights = model.named_weights().values()
    bits = allocation.bits_by_layer()
    comparable, unit = metric_units(allocation.predicted_loss_increase, scores.output_shape, spec)
    predicted_bytes = achieved(
        Budget("size", 1.0),
        profile.layers,
        profile.float_params,
        [bits[layer.name] for layer in profile.layers],
        float_bytes=profile.float_bytes,
        scheme=spec.scheme,
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
            "layers": len(profile.layers),
        },
        "data": {
            "calibration_samples": ctx.work.num_samples,
            "eval_samples": ctx.test.num_samples,
            "eval_from": ctx.eval_from,
            "labels": ctx.data.labels is not None,
        },
        "spec": spec.to_dict(),
        "budgets": [rep.to_dict() for rep in allocation.budgets],
        "allocation": dict(bits),
        "scheme": scheme_report(spec.scheme, profile.layers),
        "predicted_loss_increase": allocation.predicted_loss_increase,
        "predicted_metric_loss_increase": comparable,
        "loss_unit": unit,
        # How far to trust the prediction on this job: the measured rise over the predicted one
        # on the calibration data, before fine-tuning (1 is perfect; the second-order model
        # ignores cross-layer terms and, without labels, samples its targets).
        "measured_over_predicted": _ratio(
            scores.quantized_calib.loss - scores.float_calib.loss, comparable
        ),
        "omega_raised": {name: list(b) for name, b in allocation.raised.items()},
        "measured_loss_increase": {
            "calibration": scores.quantized_calib.loss - scores.float_calib.loss,
            "eval": scores.quantized_eval.loss - scores.float_eval.loss,
        },
        "metrics": {
            "float": scores.float_eval.to_dict(),
            "quantized": scores.quantized_eval.to_dict(),
            "finetuned": final.to_dict() if final is not None else None,
        },
        "finetune": tuned.to_dict() if tuned is not None else None,
        "sizes": {
            # The model as uploaded, in its own dtype(s): what compression is measured against.
            "model_bytes": profile.model_bytes,
            "model_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in weights}),
            "float32_bytes": 4 * profile.total_params,
            "predicted_bytes": predicted_bytes,
            "packed_checkpoint_bytes": None,
        },
        "timings": dict(ctx.clock.seconds),
        "device": str(ctx.device),
        "memory": _memory(ctx),
        "device_note": ctx.device_note,
        "notes": list(ctx.notes),
        "artifacts": [],
    }
    return finite(report)


def scheme_report(scheme: QuantScheme, layers: Sequence[LayerInfo]) -> dict[str, Any]:
    """The quantizer scheme, with the layers its group size does not fit (input size not a
    multiple of it, or not above it): those keep one scale per output channel."""
    fallback = [
        layer.name
        for layer in layers
        if scheme.group_size is not None and scheme.groups(layer.quant_shape) == 1
    ]
    return {**scheme.to_dict(), "per_channel_layers": fallback}


def _memory(ctx: JobContext) -> dict[str, Any]:
    """The batch sizes the memory plan chose and each stage's peak resident bytes."""
    plan = ctx.plan.to_dict() if ctx.plan is not None else {}
    return {**plan, "peak_bytes_by_stage": dict(ctx.stage_peaks)}


def finite(value: Any) -> Any:
    """Strict JSON: infinities and NaN (e.g. the SQNR of identical outputs) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as strict, indented JSON."""
    path.write_text(json.dumps(finite(doc), indent=2, allow_nan=False) + "\n")
    return path
