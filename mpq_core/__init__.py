"""mpq_core: the mixed-precision quantization engine.

The public API, in the order a job uses it::

    import mpq_core as mpq

    model, data = mpq.load_model("model.pt"), mpq.load_data("calib.npz")
    spec = mpq.JobSpec(budgets=["avg-bits=3"], finetune=mpq.FinetuneSpec(epochs=1))
    table = mpq.analyze(model, data, spec)          # per-layer, per-bit sensitivities
    allocation = mpq.allocate(table, spec)          # bits per layer within the budgets
    result = mpq.quantize(spec, model, data, sensitivity=table)  # in memory: a JobResult
    mpq.write_artifacts(result, "out/")             # model.pt, model.mpq.safetensors, ...

Importing this package loads nothing heavy: every name is imported on first use (a module-level
``__getattr__``), because the API process imports the pure modules (``spec``, ``budgets``,
``solvers``, ``allocation``, ``sensitivity_table``, ``layers``, ``errors``) and must never load
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> (module, attribute in it).
_EXPORTS: dict[str, tuple[str, str]] = {
    # the job, step by step
    "load_model": ("mpq_core.intake", "load_model"),
    "load_data": ("mpq_core.data", "load_data"),
    "profile_model": ("mpq_core.profiling", "profile_model"),
    "analyze": ("mpq_core.sensitivity", "analyze"),
    "allocate": ("mpq_core.allocation", "allocate"),
    "quantize": ("mpq_core.pipeline", "run"),
    "write_artifacts": ("mpq_core.artifacts", "write_artifacts"),
    "quantize_model": ("mpq_core.pipeline", "quantize_model"),
    # what they take and give
    "JobSpec": ("mpq_core.spec", "JobSpec"),
    "AnalysisSpec": ("mpq_core.spec", "AnalysisSpec"),
    "FinetuneSpec": ("mpq_core.spec", "FinetuneSpec"),
    "Method": ("mpq_core.spec", "Method"),
    "Solver": ("mpq_core.spec", "Solver"),
    "Loss": ("mpq_core.spec", "Loss"),
    "Budget": ("mpq_core.budgets", "Budget"),
    "Allocation": ("mpq_core.allocation", "Allocation"),
    "SensitivityTable": ("mpq_core.sensitivity_table", "SensitivityTable"),
    "JobResult": ("mpq_core.pipeline", "JobResult"),
    # the packed checkpoint
    "PackedCheckpoint": ("mpq_core.packed_checkpoint", "PackedCheckpoint"),
    "save_packed_checkpoint": ("mpq_core.packed_checkpoint", "save_packed_checkpoint"),
    "load_packed_checkpoint": ("mpq_core.packed_checkpoint", "load_packed_checkpoint"),
    "restore_into": ("mpq_core.packed_checkpoint", "restore_into"),
    # errors
    "MpqError": ("mpq_core.errors", "MpqError"),
    "ModelFormatError": ("mpq_core.errors", "ModelFormatError"),
    "DataError": ("mpq_core.errors", "DataError"),
    "DataMismatch": ("mpq_core.errors", "DataMismatch"),
    "SpecError": ("mpq_core.errors", "SpecError"),
    "BudgetError": ("mpq_core.errors", "BudgetError"),
    "BudgetInfeasible": ("mpq_core.errors", "BudgetInfeasible"),
}

__all__ = [  # the keys of _EXPORTS (a test checks), literal for linters and type checkers
    "Allocation",
    "AnalysisSpec",
    "Budget",
    "BudgetError",
    "BudgetInfeasible",
    "DataError",
    "DataMismatch",
    "FinetuneSpec",
    "JobResult",
    "JobSpec",
    "Loss",
    "Method",
    "ModelFormatError",
    "MpqError",
    "PackedCheckpoint",
    "SensitivityTable",
    "Solver",
    "SpecError",
    "__version__",
    "allocate",
    "analyze",
    "load_data",
    "load_model",
    "load_packed_checkpoint",
    "profile_model",
    "quantize",
    "quantize_model",
    "restore_into",
    "save_packed_checkpoint",
    "write_artifacts",
]

if TYPE_CHECKING:
    from mpq_core.allocation import Allocation, allocate
    from mpq_core.artifacts import write_artifacts
    from mpq_core.budgets import Budget
    from mpq_core.data import load_data
    from mpq_core.errors import (
        BudgetError,
        BudgetInfeasible,
        DataError,
        DataMismatch,
        ModelFormatError,
        MpqError,
        SpecError,
    )
    from mpq_core.intake import load_model
    from mpq_core.packed_checkpoint import (
        PackedCheckpoint,
        load_packed_checkpoint,
        restore_into,
        save_packed_checkpoint,
    )
    from mpq_core.pipeline import JobResult, quantize_model
    from mpq_core.pipeline import run as quantize
    from mpq_core.profiling import profile_model
    from mpq_core.sensitivity import analyze
    from mpq_core.sensitivity_table import SensitivityTable
    from mpq_core.spec import AnalysisSpec, FinetuneSpec, JobSpec, Loss, Method, Solver


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'mpq_core' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
