"""Sensitivity methods: how much the loss rises when one layer is quantized to b bits.

* ``fisher`` (default, Chen et al.): second-order model with the Fisher as Hessian.
* ``kl``: measured output distortion with only that layer quantized.
* ``hawq``: HAWQ-V2, Hutchinson trace of each layer's Hessian.
"""

from __future__ import annotations

import time
from typing import Any

from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import LoadedModel
from mpq_core.profiling import ModelProfile
from mpq_core.progress import ProgressFn
from mpq_core.quant_primitives import MAX_BITS, MIN_BITS
from mpq_core.sensitivity_table import SensitivityTable
from mpq_core.spec import Method

__all__ = ["METHODS", "compute_sensitivity"]

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
    **options: Any,
) -> SensitivityTable:
    """Score every layer of ``profile`` at every bit width with ``method``.

    Example:
        >>> table = compute_sensitivity("fisher", model, data, profile, [2, 4, 8])  # doctest: +SKIP
        >>> table.save("sens.json")  # doctest: +SKIP
    """
    bits = sorted(set(bits))
    if not bits or bits[0] < MIN_BITS or bits[-1] > MAX_BITS:
        raise SpecError(f"candidate bits must lie in {MIN_BITS}..{MAX_BITS}, got {bits}")
    start = time.perf_counter()
    if method == "fisher":
        from mpq_core.sensitivity.fisher import fisher_sensitivity

        omega = fisher_sensitivity(model, data, profile, bits, progress=progress, **options)
    elif method == "kl":
        from mpq_core.sensitivity.kl import kl_sensitivity

        omega = kl_sensitivity(model, data, profile, bits, progress=progress, **options)
    elif method == "hawq":
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
        meta={
            "model_sha256": model.sha256,
            "model_format": model.format,
            "samples": data.num_samples,
            "labels": data.labels is not None,
            "seconds": round(time.perf_counter() - start, 4),
            "options": {k: v for k, v in options.items() if isinstance(v, int | float | str)},
        },
    )
