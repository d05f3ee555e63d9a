"""The job spec: everything ``mpq quantize`` (and ``POST /v1/jobs``) accepts, as one JSON-able
dataclass. Pure Python: the API validates specs without importing torch.

This module is the one source of truth for the spec. The choices (:class:`Method`,
:class:`Solver`, :class:`Loss`) are defined here once; every field carries its help text in its
metadata, and the ``mpq`` command line generates its flags, help and defaults from these fields
(:mod:`mpq_core.cli.spec_args`), so a CLI flag and a JSON field always share one name
(``batch_size`` is ``--batch-size``, ``finetune.lr`` is ``--finetune.lr``).

JSON shape (``schema_version`` 2)::

    {"schema_version": 2, "kind": "mpq.job_spec",
     "budgets": [...], "bits": [...], "pins": {...}, "ties": [...],
     "granularity": "channel", "symmetric": true, "solver": "auto",
     "act_bits": 8, "quantize_activations": false, "cost_table": null, "batch_size": 64,
     "eval_fraction": 0.2, "output_key": null, "seed": 0, "device": "auto", "sweep": [],
     "runtime_exports": true,
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

from mpq_core.budgets import Budget, parse_budget, parse_bytes
from mpq_core.errors import SpecError
from mpq_core.layers import FLOAT_BITS
from mpq_core.patterns import compile_pattern
from mpq_core.scheme import QuantScheme
from mpq_core.spec_checks import (
    as_bool,
    as_float,
    as_int,
    as_str_list,
    check_plain_json,
    check_text,
)
from mpq_core.sweep_plan import parse_sweep

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
    "Granularity",
    "JobSpec",
    "Loss",
    "Method",
    "Solver",
    "parse_max_memory",
    "scheme_from",
]

SCHEMA_VERSION = 2
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_BATCH_SIZE = 64

# Bounds of what a spec may ask: beyond them a value is a mistake (or an attack on a worker's
# time or memory), refused with ``spec_out_of_range`` or ``spec_too_large``.
MAX_BATCH = 65_536
MAX_EPOCHS = 10_000
MAX_ITERATIONS = 100_000
MAX_LR = 10.0
MAX_LOSS_WEIGHT = 1e4
MAX_SEED = 2**32 - 1  # seeds are offset and multiplied (losses.py); 32 bits keep them in int64
MAX_BUDGETS = 16
MAX_PATTERNS = 256
MAX_BIT_ENTRIES = 64
MAX_KEY_CHARS = 200
MAX_OUTPUT_INDEX = 1_000


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


class Granularity(StrEnum):
    """Weight scales: one per output channel, or one per group of 32/64/128 input columns."""

    CHANNEL = "channel"
    G32 = "32"
    G64 = "64"
    G128 = "128"


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
        self.first_order = as_bool("analysis.first_order", self.first_order)
        if self.first_order and self.method != Method.FISHER:
            raise SpecError("analysis.first_order applies to method 'fisher' only")
        self.hawq_iterations = as_int(
            "analysis.hawq_iterations", self.hawq_iterations, 1, MAX_ITERATIONS
        )


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
        self.epochs = as_int("finetune.epochs", self.epochs, 0, MAX_EPOCHS)
        if self.steps is not None:
            self.steps = as_int("finetune.steps", self.steps, 0, MAX_ITERATIONS * 100)
        # Adam diverges far below lr 10 on any model; a learning rate beyond it is a typo.
        self.lr = as_float("finetune.lr", self.lr, 0.0, MAX_LR, above_lo=True)
        self.val_fraction = as_float("finetune.val_fraction", self.val_fraction, 0.0, 0.9)
        self.batch_size = as_int("finetune.batch_size", self.batch_size, 1, MAX_BATCH)
        self.patience = as_int("finetune.patience", self.patience, 1, MAX_EPOCHS)
        self.distill_weight = as_float(
            "finetune.distill_weight", self.distill_weight, 0.0, MAX_LOSS_WEIGHT
        )
        self.label_weight = as_float(
            "finetune.label_weight", self.label_weight, 0.0, MAX_LOSS_WEIGHT
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
        metadata=_meta(
            "candidate bit widths, comma-separated; 16 keeps a layer as a 16-bit float",
            kind="bits",
        ),
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
    granularity: Granularity = field(
        default=Granularity.CHANNEL,
        metadata=_meta(
            "weight scales per output channel, or per group of 32/64/128 input columns (layers "
            "whose input size the group does not divide keep one scale per channel)"
        ),
    )
    symmetric: bool = field(
        default=True,
        metadata=_meta(
            "signed codes, no zero point; --no-symmetric: unsigned codes with a zero point "
            "per scale (min/max clipping)"
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
    max_memory: int | str | None = field(
        default=None,
        metadata=_meta(
            "memory the job may use, e.g. 8GB or 6GiB: batch sizes are lowered to fit "
            "(default: what the machine, or the worker's limit, gives the job)",
            kind="memory",
            metavar="SIZE",
        ),
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
    sweep: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "also measure the trade-off curve: allocate, quantize (no fine-tuning) and evaluate "
            "each budget of KIND=START:STOP:STEP (e.g. avg-bits=2:8:0.5) or KIND=VALUE, and "
            "every uniform width, into curve.json (repeatable)",
            kind="append",
            metavar="KIND=START:STOP:STEP",
        ),
    )
    runtime_exports: bool = field(
        default=True,
        metadata=_meta(
            "write model.compressed.pt2 and model.onnx and run each on one batch "
            "(--no-runtime-exports: skip both; they record the model again and, for ONNX, hold "
            "one more copy of its weights)"
        ),
    )
    analysis: AnalysisSpec = field(
        default_factory=AnalysisSpec, metadata=_meta("sensitivity analysis")
    )
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec, metadata=_meta("fine-tuning"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError naming the first bad field."""
        self.budgets = as_str_list("budgets", self.budgets, MAX_BUDGETS, '["avg-bits=4"]')
        if not self.budgets:
            raise SpecError("at least one budget is needed, e.g. 'avg-bits=4'")
        self.act_bits = as_int("act_bits", self.act_bits, 2, 16)
        self.cost_table = _cost_table(self.cost_table)
        self.parsed_budgets()
        self.sweep = as_str_list("sweep", self.sweep, MAX_BUDGETS, '["avg-bits=2:8:0.5"]')
        self.parsed_sweep()
        self.bits = _bit_list(self.bits)
        self.granularity = _granularity(self.granularity)
        self.symmetric = as_bool("symmetric", self.symmetric)
        self.solver = _choice("solver", self.solver, Solver)
        self.quantize_activations = as_bool("quantize_activations", self.quantize_activations)
        self.runtime_exports = as_bool("runtime_exports", self.runtime_exports)
        self.device = _device(self.device)
        self.pins = _pins(self.pins, self.bits)
        self.ties = as_str_list("ties", self.ties, MAX_PATTERNS, '["encoder.*"]')
        for pattern in self.ties:
            compile_pattern(pattern, "tie")
        self.eval_fraction = as_float("eval_fraction", self.eval_fraction, 0.0, 0.9)
        self.batch_size = as_int("batch_size", self.batch_size, 1, MAX_BATCH)
        self.max_memory = parse_max_memory(self.max_memory)
        self.seed = as_int("seed", self.seed, 0, MAX_SEED)
        self.output_key = _output_key(self.output_key)
        if not isinstance(self.analysis, AnalysisSpec) or not isinstance(
            self.finetune, FinetuneSpec
        ):
            raise SpecError("analysis and finetune must be objects", code="spec_type")
        self.analysis.validate()
        self.finetune.validate()

    @property
    def scheme(self) -> QuantScheme:
        """The weight quantizer's scheme this job asks for."""
        return scheme_from(self.granularity, self.symmetric)

    def parsed_budgets(self) -> list[Budget]:
        return [
            parse_budget(text, act_bits=self.act_bits, table_layers=self.cost_table)
            for text in self.budgets
        ]

    def parsed_sweep(self) -> list[Budget]:
        """The budgets of ``sweep``, every range expanded (:func:`mpq_core.sweep_plan.parse_sweep`)."""
        return parse_sweep(self.sweep, act_bits=self.act_bits, table_layers=self.cost_table)

    @property
    def finetunes(self) -> bool:
        return self.finetune.enabled

    @property
    def memory_budget(self) -> int | None:
        """``max_memory`` in bytes (validation turns a size such as ``"8GB"`` into a number)."""
        return None if self.max_memory is None else int(self.max_memory)

    def sensitivity_settings(self, *, has_eval_data: bool) -> dict[str, Any]:
        """What, beside the model and the data, decides this job's sensitivity table (JSON).

        Without separate evaluation data the table is computed on the data minus the held-out
        ``eval_fraction`` (split with ``seed``), so that fraction is part of it too.
        """
        # The scheme only when not the default, so tables stored before schemes keep their key.
        scheme = {} if self.scheme.is_default else {"scheme": self.scheme.to_dict()}
        return {
            "analysis": _plain(asdict(self.analysis)),
            "bits": list(self.bits),
            **scheme,
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
        if not isinstance(d, dict):
            raise SpecError("a job spec must be a JSON object", code="spec_type")
        check_plain_json(d)
        version = d.get("schema_version")
        if version is None:
            version = 1 if set(d) & set(V1_FIELDS) else SCHEMA_VERSION
        version = as_int("schema_version", version, 1, 1_000_000)
        if version > SCHEMA_VERSION:
            raise SpecError(f"job spec schema_version {version} is newer than this mpq reads")
        body = {k: v for k, v in d.items() if k not in ("schema_version", "kind")}
        if version < 2:
            body = _upgrade_v1(body)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        parts: dict[str, Any] = {}
        for name, part_cls in (("analysis", AnalysisSpec), ("finetune", FinetuneSpec)):
            part = body.pop(name, {})
            if not isinstance(part, dict):
                raise SpecError(
                    f"job spec field {name} must be an object, got {type(part).__name__}",
                    code="spec_type",
                )
            part_known = {f.name for f in fields(part_cls)}
            unknown += sorted(f"{name}.{k}" for k in set(part) - part_known)
            parts[name] = part
        if unknown:
            # A few names say what is wrong; 50,000 of them would only make a huge answer.
            shown = ", ".join(name[:60] for name in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise SpecError(f"unknown job spec field(s): {shown}{more}")
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
    if not isinstance(value, str):
        raise SpecError(f"{name} must be a string, got {value!r:.60}", code="spec_type")
    try:
        return allowed(value)
    except ValueError:
        choices = ", ".join(m.value for m in allowed)
        raise SpecError(f"{name} must be one of {choices}, got {value!r}") from None


def _granularity(value: Any) -> Granularity:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # JSON may give the group size as a number
    return _choice("granularity", value, Granularity)


def scheme_from(granularity: Any = "channel", symmetric: Any = True) -> QuantScheme:
    """The quantizer scheme of a spec's ``granularity`` and ``symmetric`` (validated)."""
    g = _granularity(granularity)
    size = None if g == Granularity.CHANNEL else int(g.value)
    return QuantScheme(group_size=size, symmetric=as_bool("symmetric", symmetric))


def _bit_list(bits: Any) -> list[int]:
    """The candidate widths, sorted and without repeats."""
    if not isinstance(bits, (list, tuple)) or not bits:
        raise SpecError(
            f"bits must be a non-empty list of widths in 2..8 or 16 (kept in float), "
            f"e.g. [2, 4, 8], got {bits!r:.60}",
            code="spec_type",
        )
    if len(bits) > MAX_BIT_ENTRIES:
        raise SpecError(
            f"bits has {len(bits)} entries; list each width once", code="spec_too_large"
        )
    widths = {as_int(f"bits[{i}]", b, -(2**31), 2**31) for i, b in enumerate(bits)}
    if any(not 2 <= b <= 8 and b != FLOAT_BITS for b in widths):
        raise SpecError(
            f"bits must be widths in 2..8 or {FLOAT_BITS} (kept in float), got {sorted(widths)}",
            code="spec_out_of_range",
        )
    return sorted(widths)


def _pins(pins: Any, bits: list[int]) -> dict[str, int]:
    if not isinstance(pins, dict):
        raise SpecError(
            'pins must be an object mapping patterns to bits, e.g. {"fc.weight": 8}',
            code="spec_type",
        )
    if len(pins) > MAX_PATTERNS:
        raise SpecError(
            f"pins has {len(pins)} entries; at most {MAX_PATTERNS} are accepted",
            code="spec_too_large",
        )
    out: dict[str, int] = {}
    for pattern, b in pins.items():
        compile_pattern(pattern, "pin")
        out[pattern] = as_int(f"pin {pattern}", b, 2, 8)
        if out[pattern] not in bits:
            raise SpecError(f"pin {pattern}={b}: {b} is not among the candidate bits {bits}")
    return out


def _device(device: Any) -> str:
    # ASCII digits only (\d would accept other scripts' digits, which torch does not read) and
    # at most four of them: cuda:99999999999999999999 overflows torch's device index.
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,4})?", device):
        raise SpecError(
            f"device must be auto, cpu, cuda or cuda:N, got {device!r:.60}",
            code="spec_type" if not isinstance(device, str) else "invalid_spec",
        )
    return device


def parse_max_memory(value: Any) -> int | None:
    """``max_memory`` in bytes, from a number or a size such as ``"8GB"``; at least 64 MiB, at
    most 1 PiB.

    Raises:
        SpecError: ``invalid_spec``, ``spec_type``, ``spec_not_finite`` or ``spec_out_of_range``
            for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = check_text("max_memory", value, max_chars=40)
        try:
            value = parse_bytes(text)
        except ValueError as exc:
            raise SpecError(f"max_memory: {exc}", code="invalid_spec") from exc
    return int(as_float("max_memory", value, 2**26, 2**50))


def _output_key(key: Any) -> str | int | None:
    if key is None:
        return None
    if isinstance(key, str):
        return check_text("output_key", key, max_chars=MAX_KEY_CHARS)
    return as_int("output_key", key, -MAX_OUTPUT_INDEX, MAX_OUTPUT_INDEX)


def _cost_table(table: Any) -> dict[str, Any] | None:
    """The cost table's ``layers`` object (entries are checked when a table budget parses it)."""
    if table is not None and not isinstance(table, dict):
        raise SpecError(
            "cost_table must be an object mapping layer names to {bits: cost}", code="spec_type"
        )
    return table


def _plain(value: Any) -> Any:
    """Enum members as their plain string values, recursively (JSON documents hold str)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
