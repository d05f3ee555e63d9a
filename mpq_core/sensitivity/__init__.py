"""Sensitivity methods: how much the loss rises when one layer is quantized to b bits.

* ``fisher`` (default, Chen et al.): second-order model with the Fisher as Hessian.
* ``kl``: measured output distortion with only that layer quantized.
* ``hawq``: HAWQ-V2, Hutchinson trace of each layer's Hessian.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import LoadedModel
from mpq_core.profiling import ModelProfile, profile_model
from mpq_core.progress import ProgressFn
from mpq_core.quant_primitives import FLOAT_BITS, MAX_BITS, MIN_BITS
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import DEFAULT_BATCH_SIZE, DEFAULT_BITS, AnalysisSpec, JobSpec, Method

__all__ = ["METHODS", "analyze", "compute_sensitivity"]

#: The method names, as :class:`mpq_core.spec.Method` defines them.
METHODS: tuple[str, ...] = tuple(m.value for m in Method)


def compute_sensitivity(
    method: str,
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    bits: list[int],
    *,
    progress: ProgressFn | None = None,
    scheme: QuantScheme | None = None,
    **options: Any,
) -> SensitivityTable:
    """Score every layer of ``profile`` at every bit width with ``method``, the weights
    quantized with ``scheme`` (per-channel symmetric when None; recorded in the table's meta,
    so a table is not reused for another scheme).

    Example:
        >>> table = compute_sensitivity("fisher", model, data, profile, [2, 4, 8])  # doctest: +SKIP
        >>> table.save("sens.json")  # doctest: +SKIP
    """
    bits = sorted(set(bits))
    if not bits or any(not MIN_BITS <= b <= MAX_BITS and b != FLOAT_BITS for b in bits):
        raise SpecError(
            f"candidate bits must lie in {MIN_BITS}..{MAX_BITS} or be {FLOAT_BITS} "
            f"(kept in float), got {bits}"
        )
    start = time.perf_counter()
    scheme = scheme or QuantScheme()
    options = {**options, "scheme": scheme}
    if method == Method.FISHER:
        from mpq_core.sensitivity.fisher import fisher_sensitivity

        omega = fisher_sensitivity(model, data, profile, bits, progress=progress, **options)
    elif method == Method.KL:
        from mpq_core.sensitivity.kl import kl_sensitivity

        omega = kl_sensitivity(model, data, profile, bits, progress=progress, **options)
    elif method == Method.HAWQ:
        from mpq_core.sensitivity.hawq import hawq_sensitivity

        omega = hawq_sensitivity(model, data, profile, bits, progress=progress, **options)
    else:
        raise SpecError(f"unknown sensitivity method {method!r}; use one of {', '.join(METHODS)}")
    return SensitivityTable(
        method=method,
        bits=bits,
        layers=profile.layers,
        omega=omega,
        float_params=profile.float_params,
        model_bytes=profile.model_bytes,
        float_bytes=profile.float_bytes,
        meta={
            "model_sha256": model.sha256,
            "model_format": model.format,
            "samples": data.num_samples,
            "labels": data.labels is not None,
            "seconds": round(time.perf_counter() - start, 4),
            "options": {k: v for k, v in options.items() if isinstance(v, int | float | str)},
            "scheme": scheme.to_dict(),
            # Weights stored (in, out, ...) are quantized along their output channels (dim 1);
            # tables without this mark scaled them along dim 0 and are not reused for them.
            "scales_along": "output",
        },
    )


def analyze(
    model: LoadedModel,
    data: CalibrationData,
    spec: JobSpec | AnalysisSpec | None = None,
    *,
    bits: Sequence[int] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    output_key: Any = None,
    profile: ModelProfile | None = None,
    progress: ProgressFn | None = None,
    scheme: QuantScheme | None = None,
) -> SensitivityTable:
    """The sensitivity table of ``model`` on ``data``, as a job spec asks for it.

    Args:
        model: the loaded model (see :func:`mpq_core.intake.load_model`).
        data: calibration data (see :func:`mpq_core.data.load_data`).
        spec: a :class:`JobSpec` (its ``analysis``, ``bits``, ``batch_size``, ``seed`` and
            ``output_key`` are used), or just an :class:`AnalysisSpec`; default ``AnalysisSpec()``.
        bits, batch_size, seed, output_key: override the job spec's (or, with an
            ``AnalysisSpec``, the defaults: ``DEFAULT_BITS``, ``DEFAULT_BATCH_SIZE``, 0, None).
        profile: the model's layers, when already profiled on ``data``.
        progress: called as ``progress(method, fraction, metrics)``.
        scheme: the quantizer scheme; default the job spec's (per-channel symmetric without one).

    Example:
        >>> table = analyze(model, data, AnalysisSpec(method="kl"), bits=[2, 4, 8])  # doctest: +SKIP
    """
    job: JobSpec | None = None
    if isinstance(spec, JobSpec):
        job, analysis = spec, spec.analysis
    else:
        analysis = spec or AnalysisSpec()
    bits = list(bits if bits is not None else job.bits if job is not None else DEFAULT_BITS)
    if batch_size is None:
        batch_size = job.batch_size if job is not None else DEFAULT_BATCH_SIZE
    if seed is None:
        seed = job.seed if job is not None else 0
    if output_key is None and job is not None:
        output_key = job.output_key
    options: dict[str, Any] = {"batch_size": batch_size, "loss": analysis.loss.value}
    if output_key is not None:
        options["output_key"] = output_key
    if analysis.method == Method.HAWQ:
        options.update(iterations=analysis.hawq_iterations, seed=seed)
    if analysis.first_order:
        options["first_order"] = True
    if profile is None:
        profile = profile_model(model, data, batch_size=batch_size)
    if scheme is None:
        scheme = job.scheme if job is not None else QuantScheme()
    return compute_sensitivity(
        analysis.method.value,
        model,
        data,
        profile,
        bits,
        progress=progress,
        scheme=scheme,
        **options,
    )
