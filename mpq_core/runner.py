"""Running a loaded model on calibration data: fit checks and batching.

A torch.export program traced with a fixed batch size only accepts that size, so batches are
padded up to it (with copies of the last sample) and the padding is dropped from the results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mpq_core.data import CalibrationData
from mpq_core.errors import DataMismatch
from mpq_core.intake import LoadedModel, select_output

__all__ = [
    "MIN_CALIBRATION_SAMPLES",
    "MODEL_ERRORS",
    "Batch",
    "check_data_fits",
    "check_data_values",
    "check_finetune_samples",
    "error_summary",
    "iter_batches",
    "run_model",
]

#: What an uploaded model's own forward raises when it cannot run an input (TorchScript raises
#: ``torch.jit.Error``, which is not a RuntimeError).
MODEL_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    IndexError,
    TypeError,
    AssertionError,
    torch.jit.Error,
)


#: Fewest calibration samples a job accepts: with one, nothing can be held out for evaluation
#: and the Fisher average is a single outer product.
MIN_CALIBRATION_SAMPLES = 2


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """One line saying why ``exc`` was raised. TorchScript wraps a model's own error in a
    serialized-code traceback whose first line is generic; its last ``...Error: ...`` line is
    the cause."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    causes = [line for line in lines if "Error: " in line or "Exception: " in line]
    # The interpreter also raises plain RuntimeErrors that open with its generic line.
    generic = isinstance(exc, torch.jit.Error) or lines[0].startswith("The following operation")
    return (causes[-1] if generic and causes else lines[0])[:limit]


@dataclass
class Batch:
    """One batch as the model will see it; the first ``valid`` rows are real samples."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor | None
    valid: int
    start: int


def check_data_fits(
    model: LoadedModel,
    data: CalibrationData,
    *,
    output_key: Any = None,
    min_samples: int = MIN_CALIBRATION_SAMPLES,
) -> None:
    """Raise DataMismatch (with what to change) if the data cannot feed the model, or its labels
    do not fit the scored output (``output_key``, as in the job spec).

    Args:
        min_samples: fewest samples accepted (calibration needs :data:`MIN_CALIBRATION_SAMPLES`;
            evaluation data may hold one).
    """
    check_data_values(data, min_samples=min_samples)
    _check_inputs_match(model, data)
    probe = next(iter_batches(model, data, 2))
    try:
        with torch.no_grad():
            out = select_output(model(*probe.inputs), output_key)
    except MODEL_ERRORS as exc:
        raise DataMismatch(
            f"the model fails on the data: {error_summary(exc)}. Check the per-sample input shapes "
            f"{[tuple(t.shape[1:]) for t in data.inputs]} and dtypes "
            f"{[str(t.dtype) for t in data.inputs]}",
            code="data_mismatch",
        ) from exc
    if out.is_floating_point() and not bool(torch.isfinite(out[: probe.valid]).all()):
        raise DataMismatch(
            "the model's output on the first samples holds NaN or infinite values although the "
            "inputs are finite; check that the model runs in float32 on this data (a float16 "
            "model can overflow) and that the inputs are scaled as in training",
            code="output_not_finite",
        )
    _check_labels(data, out)
    _probe_extremes(model, data, output_key)


def _extreme_samples(data: CalibrationData) -> list[tuple[int, int, int]]:
    """``(sample, input, value)`` for the samples holding the largest and the smallest value of
    each integer input, outside the first probe batch (samples 0 and 1)."""
    found: dict[int, tuple[int, int]] = {}
    for i, tensor in enumerate(data.inputs):
        flat = tensor.reshape(tensor.shape[0], -1)
        if tensor.is_floating_point() or tensor.dtype == torch.bool or not flat.shape[1]:
            continue
        top, bottom = flat.max(dim=1).values, flat.min(dim=1).values
        high, low = int(top.argmax()), int(bottom.argmin())
        found.setdefault(high, (i, int(top[high])))
        found.setdefault(low, (i, int(bottom[low])))
    return [(sample, *found[sample]) for sample in sorted(found) if sample >= 2]


def _probe_extremes(model: LoadedModel, data: CalibrationData, output_key: Any) -> None:
    """Run the model on the samples holding each integer input's extreme values: a token id past
    the vocabulary in sample 900 would otherwise fail the job halfway through the analysis."""
    extremes = _extreme_samples(data)
    if not extremes:
        return
    picked = data.subset(torch.tensor([sample for sample, _, _ in extremes]))
    for batch in iter_batches(model, picked, 2):
        try:
            with torch.no_grad():
                select_output(model(*batch.inputs), output_key)
        except MODEL_ERRORS as exc:
            rows = extremes[batch.start : batch.start + batch.valid]
            where = " or ".join(f"sample {s} (input {i} holds {v})" for s, i, v in rows)
            raise DataMismatch(
                f"the model fails on {where}: {error_summary(exc)}; integer inputs such as token "
                "ids must lie within what the model accepts (its vocabulary)",
                code="data_out_of_range",
            ) from exc


def check_data_values(data: CalibrationData, *, min_samples: int = MIN_CALIBRATION_SAMPLES) -> None:
    """Raise DataMismatch when the data holds too few samples, a NaN or an infinity in a float
    input, or labels that are not one class id per sample (or per position)."""
    if data.num_samples < min_samples:
        raise DataMismatch(
            f"the data holds {data.num_samples} sample(s); at least {min_samples} are needed "
            "(sensitivities average over samples, and some are held out for evaluation): give "
            "more samples along the first axis",
            code="data_too_few_samples",
        )
    for i, tensor in enumerate(data.inputs):
        if tensor.is_floating_point():
            bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                samples = torch.nonzero(bad).flatten()
                raise DataMismatch(
                    f"input {i} holds NaN or infinite values in {samples.numel()} sample(s) "
                    f"(the first is sample {int(samples[0])}); replace them or drop those samples",
                    code="data_not_finite",
                )
    if data.labels is not None and data.labels.dim() not in (1, 2):
        raise DataMismatch(
            f"'labels' has shape {tuple(data.labels.shape)}; give one class id per sample "
            "(shape (N,)), or per position for a model scoring each position (shape (N, T))",
            code="data_labels",
        )


def check_finetune_samples(work: CalibrationData) -> None:
    """Raise DataMismatch when fine-tuning would have no sample to train on or none to hold out
    (``work``: the data left once evaluation data is held out)."""
    if work.num_samples < MIN_CALIBRATION_SAMPLES:
        raise DataMismatch(
            f"fine-tuning needs at least {MIN_CALIBRATION_SAMPLES} samples to train on and hold "
            f"out, but {work.num_samples} remain once evaluation data is held out; give more "
            "samples, separate evaluation data, or set finetune.epochs to 0",
            code="data_too_few_samples",
        )


def _check_inputs_match(model: LoadedModel, data: CalibrationData) -> None:
    if len(data.inputs) != model.num_inputs:
        keys = (
            "'input'"
            if model.num_inputs == 1
            else ", ".join(f"'input_{i}'" for i in range(model.num_inputs))
        )
        raise DataMismatch(
            f"the model takes {model.num_inputs} positional input(s) but the data holds "
            f"{len(data.inputs)}; provide {keys}",
            code="data_input_count",
        )
    for i, (spec, tensor) in enumerate(zip(model.input_specs, data.inputs, strict=False)):
        if spec.dtype is not None and tensor.dtype != spec.dtype:
            raise DataMismatch(
                f"input {i} has dtype {tensor.dtype} but the model expects {spec.dtype}",
                code="data_dtype",
            )
        if spec.shape is not None:
            got = tuple(tensor.shape)
            if len(got) != len(spec.shape) or any(
                want is not None and want != g
                for want, g in zip(spec.shape[1:], got[1:], strict=False)
            ):
                want_txt = tuple("N" if d is None else d for d in spec.shape[1:])
                raise DataMismatch(
                    f"input {i} has per-sample shape {got[1:]} but the model expects {want_txt}",
                    code="data_shape",
                )


def _check_labels(data: CalibrationData, out: torch.Tensor) -> None:
    """Labels must be class ids of the scored output: its per-sample shape less the class axis,
    each in ``[0, classes)``."""
    if data.labels is not None and out.dim() in (2, 3) and out.is_floating_point():
        want = tuple(out.shape[1:-1])
        got = tuple(data.labels.shape[1:])
        if got != want:
            where = (
                "per sample"
                if not want
                else f"per position (per-sample output {tuple(out.shape[1:])})"
            )
            raise DataMismatch(
                f"labels have per-sample shape {got} but the model scores classes {where}; give "
                f"labels of per-sample shape {want}, or leave 'labels' out (they are then drawn "
                "from the model's own predictions)",
                code="data_labels",
            )
    if data.labels is not None and out.dim() >= 2:
        classes = out.shape[-1]
        top = int(data.labels.max()) if data.labels.numel() else 0
        if int(data.labels.min()) < 0 or top >= classes:
            raise DataMismatch(
                f"labels range over [{int(data.labels.min())}, {top}] but the model scores "
                f"{classes} classes",
                code="data_labels",
            )


def iter_batches(model: LoadedModel, data: CalibrationData, batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` (or the model's fixed batch), padded where the model needs it."""
    size = model.fixed_batch or batch_size
    for start in range(0, data.num_samples, size):
        part = data.subset(slice(start, start + size))
        valid = part.num_samples
        inputs = part.inputs
        labels = part.labels
        if model.fixed_batch and valid < size:
            pad = size - valid
            inputs = [torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in inputs]
            if labels is not None:
                labels = torch.cat([labels, labels[-1:].expand(pad)])
        yield Batch(inputs=inputs, labels=labels, valid=valid, start=start)


def run_model(model: LoadedModel, data: CalibrationData, batch_size: int = 64) -> torch.Tensor:
    """The scored output over all samples, without gradients."""
    outs = []
    with torch.no_grad():
        for batch in iter_batches(model, data, batch_size):
            outs.append(select_output(model(*batch.inputs))[: batch.valid])
    return torch.cat(outs)
