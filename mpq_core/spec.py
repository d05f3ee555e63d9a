"""The job spec: everything ``mpq quantize`` (and ``POST /v1/jobs``) accepts, as one JSON-able
dataclass. Pure Python: the API validates specs without importing torch.

This module is the one source of truth for the spec. The choices (:class:`Method`,
:class:`Solver`, :class:`Loss`) are defined here once; every field carries its help text in its
metadata, and the ``mpq`` command line generates its flags, help and defaults from these fields
(:mod:`mpq_core.cli.spec_args`), so a CLI flag and a JSON field always share one name
(``batch_size`` is ``--batch-size``, ``finetune.lr`` is ``--finetune.lr``).

JSON shape (``schema_version`` 2)::

    {"schema_version": 2, "kind": "mpq.job_spec",
     "budgets": [...], "bits": [...], "pins": {...}, "ties": [...], "solver": "auto",
     "act_bits": 8, "quantize_activations": false, "cost_table": null, "batch_size": 64,
     "eval_fraction": 0.2, "output_key": null, "seed": 0, "device": "auto",
     "analysis": {"method": "fisher", "loss": "auto", "first_order": false,
                  "hawq_iterations": 200},
     "finetune": {"epochs": 5, "steps": null, "lr": 0.0001, "batch_size": 32,
                  "val_fraction": 0.1, "patience": 3, "distill_weight": 1.0,
                  "label_weight": 1.0}}

:meth:`JobSpec.from_dict` also reads ``schema_version`` 1 documents (flat, as stored in users'
databases and sent by existing clients); :data:`V1_FIELDS` says where each old field went.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

from mpq_core.budgets import Budget, parse_budget
from mpq_core.errors import SpecError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BITS",
    "SCHEMA_VERSION",
    "V1_FIELDS",
    "AnalysisSpec",
    "FinetuneSpec",
    "JobSpec",
    "Loss",
    "Method",
    "Solver",
]

SCHEMA_VERSION = 2
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_BATCH_SIZE = 64


class Method(StrEnum):
    """Sensitivity methods (:mod:`mpq_core.sensitivity`)."""

    FISHER = "fisher"
    KL = "kl"
    HAWQ = "hawq"


class Solver(StrEnum):
    """Multiple-choice knapsack solvers (:mod:`mpq_core.solvers`)."""

    AUTO = "auto"
    GREEDY = "greedy"
    EXACT = "exact"


class Loss(StrEnum):
    """The loss sensitivities are measured on (:mod:`mpq_core.losses`)."""

    AUTO = "auto"
    CE = "ce"
    MSE = "mse"


def _meta(help: str, **cli: Any) -> dict[str, Any]:
    """A spec field's metadata: its help text and how the CLI reads it (``kind``: ``append``,
    ``pins``, ``bits``, ``int``, ``key``, ``cost_table``; ``alias``; ``metavar``)."""
    return {"help": help, **cli}


@dataclass
class AnalysisSpec:
    """How layer sensitivities are measured (everything here changes the sensitivity table)."""

    method: Method = field(
        default=Method.FISHER,
        metadata=_meta(
            "sensitivity method: fisher (Fisher information, Chen et al.), kl (measured output "
            "divergence with one layer quantized), hawq (Hutchinson Hessian trace)"
        ),
    )
    loss: Loss = field(
        default=Loss.AUTO,
        metadata=_meta(
            "auto: cross entropy on class scores (with labels, or labels drawn from the model's own "
            "predictions), output-space Gauss-Newton otherwise"
        ),
    )
    first_order: bool = field(
        default=False,
        metadata=_meta(
            "fisher: add the gradient term the paper drops (helps when the calibration data is held "
            "out and the model is not at a minimum of its loss there)"
        ),
    )
    hawq_iterations: int = field(default=200, metadata=_meta("Hutchinson iterations (hawq)"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError naming the first bad field."""
        self.method = _choice("analysis.method", self.method, Method)
        self.loss = _choice("analysis.loss", self.loss, Loss)
        if self.first_order and self.method != Method.FISHER:
            raise SpecError("analysis.first_order applies to method 'fisher' only")
        if int(self.hawq_iterations) < 1:
            raise SpecError("analysis.hawq_iterations must be at least 1")


@dataclass
class FinetuneSpec:
    """Quantization-aware fine-tuning (:mod:`mpq_core.finetune`)."""

    epochs: int = field(default=5, metadata=_meta("passes over the data; 0 skips fine-tuning"))
    steps: int | None = field(
        default=None, metadata=_meta("optimiser steps instead of epochs", kind="int")
    )
    lr: float = field(default=1e-4, metadata=_meta("Adam learning rate (cosine decay to zero)"))
    batch_size: int = field(default=32, metadata=_meta("samples per step"))
    val_fraction: float = field(
        default=0.1, metadata=_meta("share of the data held out to pick the best epoch")
    )
    patience: int = field(
        default=3, metadata=_meta("stop after this many epochs without a better held-out loss")
    )
    distill_weight: float = field(
        default=1.0, metadata=_meta("weight of the distillation loss against the float model")
    )
    label_weight: float = field(
        default=1.0, metadata=_meta("weight of the cross entropy against labels (when present)")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError naming the first bad field."""
        if self.epochs < 0 or (self.steps is not None and self.steps < 0):
            raise SpecError("finetune.epochs and finetune.steps must not be negative")
        if not self.lr > 0:
            raise SpecError("finetune.lr must be positive")
        if not 0.0 <= self.val_fraction <= 0.9:
            raise SpecError(f"finetune.val_fraction must be in [0.0, 0.9], got {self.val_fraction}")
        for name in ("batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise SpecError(f"finetune.{name} must be at least 1")
        if self.distill_weight < 0 or self.label_weight < 0:
            raise SpecError(
                "finetune.distill_weight and finetune.label_weight must not be negative"
            )

    @property
    def enabled(self) -> bool:
        """Whether any fine-tuning step runs (``steps`` wins over ``epochs`` when set)."""
        return bool(self.steps) if self.steps is not None else self.epochs > 0


@dataclass
class JobSpec:
    """A quantization job.

    Example:
        >>> spec = JobSpec(budgets=["avg-bits=3"], finetune=FinetuneSpec(epochs=1))
        >>> JobSpec.from_dict(spec.to_dict()) == spec
        True
    """

    budgets: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "KIND=VALUE: avg-bits=3, size=1.5MB, compression=8x, bitops=1.2G, table=VALUE "
            "(repeatable; all must hold)",
            kind="append",
            alias="--budget",
            metavar="KIND=VALUE",
        ),
    )
    bits: list[int] = field(
        default_factory=lambda: list(DEFAULT_BITS),
        metadata=_meta("candidate bit widths, comma-separated", kind="bits"),
    )
    pins: dict[str, int] = field(
        default_factory=dict,
        metadata=_meta(
            "fix the layers whose name matches REGEX (full match) at BITS (repeatable)",
            kind="pins",
            alias="--pin",
            metavar="REGEX=BITS",
        ),
    )
    ties: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "give all layers matching REGEX one shared bit width (repeatable)",
            kind="append",
            alias="--tie",
            metavar="REGEX",
        ),
    )
    solver: Solver = field(default=Solver.AUTO, metadata=_meta("knapsack solver"))
    act_bits: int = field(
        default=8,
        metadata=_meta("activation bits: used by bitops budgets, and by --quantize-activations"),
    )
    quantize_activations: bool = field(
        default=False,
        metadata=_meta(
            "also fake-quantize the inputs of quantized layers at --act-bits (per tensor)"
        ),
    )
    cost_table: dict[str, Any] | None = field(
        default=None,
        metadata=_meta(
            "per-layer per-bit costs for table= budgets: a JSON file on the command line, its "
            "'layers' object in a spec",
            kind="cost_table",
            metavar="FILE",
        ),
    )
    batch_size: int = field(
        default=DEFAULT_BATCH_SIZE, metadata=_meta("samples per pass in analysis and evaluation")
    )
    eval_fraction: float = field(
        default=0.2,
        metadata=_meta(
            "share of the data held out for evaluation when no evaluation data is given"
        ),
    )
    output_key: str | int | None = field(
        default=None,
        metadata=_meta(
            "which element of a tuple/dict model output to score", kind="key", metavar="KEY"
        ),
    )
    seed: int = field(
        default=0, metadata=_meta("every random choice (splits, sampled labels, probes)")
    )
    device: str = field(
        default="auto", metadata=_meta("auto (CUDA when present), cpu, cuda or cuda:N")
    )
    analysis: AnalysisSpec = field(
        default_factory=AnalysisSpec, metadata=_meta("sensitivity analysis")
    )
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec, metadata=_meta("fine-tuning"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError naming the first bad field."""
        if not self.budgets:
            raise SpecError("at least one budget is needed, e.g. 'avg-bits=4'")
        self.parsed_budgets()
        if not self.bits or any(not 2 <= int(b) <= 8 for b in self.bits):
            raise SpecError(f"bits must be a non-empty list of widths in 2..8, got {self.bits}")
        self.bits = sorted({int(b) for b in self.bits})
        self.solver = _choice("solver", self.solver, Solver)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise SpecError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for pattern, b in self.pins.items():
            _regex("pin", pattern)
            if int(b) not in self.bits:
                raise SpecError(
                    f"pin {pattern}={b}: {b} is not among the candidate bits {self.bits}"
                )
        for pattern in self.ties:
            _regex("tie", pattern)
        if not 2 <= self.act_bits <= 16:
            raise SpecError(f"act_bits must be in 2..16, got {self.act_bits}")
        if not 0.0 <= self.eval_fraction <= 0.9:
            raise SpecError(f"eval_fraction must be in [0.0, 0.9], got {self.eval_fraction}")
        if int(self.batch_size) < 1:
            raise SpecError("batch_size must be at least 1")
        self.analysis.validate()
        self.finetune.validate()

    def parsed_budgets(self) -> list[Budget]:
        return [
            parse_budget(text, act_bits=self.act_bits, table_layers=self.cost_table)
            for text in self.budgets
        ]

    @property
    def finetunes(self) -> bool:
        return self.finetune.enabled

    def sensitivity_settings(self, *, has_eval_data: bool) -> dict[str, Any]:
        """What, beside the model and the data, decides this job's sensitivity table (JSON).

        Without separate evaluation data the table is computed on the data minus the held-out
        ``eval_fraction`` (split with ``seed``), so that fraction is part of it too.
        """
        return {
            "analysis": _plain(asdict(self.analysis)),
            "bits": list(self.bits),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "output_key": self.output_key,
            "calibration": "all" if has_eval_data else f"holdout:{self.eval_fraction!r}",
        }

    def to_dict(self) -> dict[str, Any]:
        """The spec as a ``schema_version`` 2 JSON document."""
        return {"schema_version": SCHEMA_VERSION, "kind": "mpq.job_spec", **_plain(asdict(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        """Read a ``schema_version`` 2 document, or a flat version 1 one (see :data:`V1_FIELDS`;
        a document without ``schema_version`` is read as version 1 when it uses a version 1
        name)."""
        version = d.get("schema_version")
        if version is None:
            version = 1 if set(d) & set(V1_FIELDS) else SCHEMA_VERSION
        if int(version) > SCHEMA_VERSION:
            raise SpecError(f"job spec schema_version {version} is newer than this mpq reads")
        body = {k: v for k, v in d.items() if k not in ("schema_version", "kind")}
        if int(version) < 2:
            body = _upgrade_v1(body)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        parts: dict[str, Any] = {}
        for name, part_cls in (("analysis", AnalysisSpec), ("finetune", FinetuneSpec)):
            part = body.pop(name, {})
            if not isinstance(part, dict):
                raise SpecError(f"job spec field {name} must be an object, got {part!r}")
            part_known = {f.name for f in fields(part_cls)}
            unknown += sorted(f"{name}.{k}" for k in set(part) - part_known)
            parts[name] = part
        if unknown:
            raise SpecError(f"unknown job spec field(s): {', '.join(unknown)}")
        try:
            return cls(
                **body,
                analysis=AnalysisSpec(**parts["analysis"]),
                finetune=FinetuneSpec(**parts["finetune"]),
            )
        except TypeError as exc:
            raise SpecError(f"bad job spec: {exc}") from exc


#: Where each flat ``schema_version`` 1 field moved in version 2 (sub-object, field name).
V1_FIELDS: dict[str, tuple[str, str]] = {
    "method": ("analysis", "method"),
    "loss": ("analysis", "loss"),
    "first_order": ("analysis", "first_order"),
    "hawq_iterations": ("analysis", "hawq_iterations"),
    "finetune_epochs": ("finetune", "epochs"),
    "finetune_steps": ("finetune", "steps"),
    "finetune_lr": ("finetune", "lr"),
    "finetune_batch_size": ("finetune", "batch_size"),
    "val_fraction": ("finetune", "val_fraction"),
    "patience": ("finetune", "patience"),
}


def _upgrade_v1(body: dict[str, Any]) -> dict[str, Any]:
    """A flat version 1 document in the version 2 shape."""
    nested = sorted(set(body) & {"analysis", "finetune"})
    if nested:
        raise SpecError(
            f"unknown job spec field(s): {', '.join(nested)} (a schema_version 1 spec is flat; "
            "send schema_version 2 for sub-objects)"
        )
    out: dict[str, Any] = {"analysis": {}, "finetune": {}}
    for key, value in body.items():
        if key in V1_FIELDS:
            part, name = V1_FIELDS[key]
            out[part][name] = value
        else:
            out[key] = value
    return out


_E = TypeVar("_E", bound=StrEnum)


def _choice(name: str, value: Any, allowed: type[_E]) -> _E:
    try:
        return allowed(value)
    except ValueError:
        choices = ", ".join(m.value for m in allowed)
        raise SpecError(f"{name} must be one of {choices}, got {value!r}") from None


def _regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpecError(f"{what} pattern {pattern!r} is not a valid regex: {exc}") from exc


def _plain(value: Any) -> Any:
    """Enum members as their plain string values, recursively (JSON documents hold str)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
