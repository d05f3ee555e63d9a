"""The job spec: everything ``mpq quantize`` (and ``POST /v1/jobs``) accepts, as one JSON-able
dataclass. Pure Python: the API validates specs without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mpq_core.budgets import Budget, parse_budget
from mpq_core.errors import SpecError

__all__ = ["SCHEMA_VERSION", "JobSpec"]

SCHEMA_VERSION = 1
_METHODS = ("fisher", "kl", "hawq")
_SOLVERS = ("greedy", "exact", "auto")
_LOSSES = ("auto", "ce", "mse")


@dataclass
class JobSpec:
    """A quantization job.

    Attributes:
        budgets: ``KIND=VALUE`` strings, e.g. ``["avg-bits=3", "size=1MB"]``; all must hold.
        bits: candidate bit widths.
        method: sensitivity method (``fisher``, ``kl``, ``hawq``).
        pins: layer-name regex -> bits (full match).
        ties: layer-name regexes whose layers share one bit width.
        solver: ``auto``, ``greedy`` or ``exact``.
        act_bits: activation bits; used by ``bitops`` budgets, and activations are quantized
            (per tensor, calibrated) in evaluation and fine-tuning when ``quantize_activations``.
        quantize_activations: fake-quantize the inputs of quantized layers at ``act_bits``.
        cost_table: the ``layers`` object of a per-layer cost table for ``table`` budgets.
        loss: sensitivity loss (``auto``, ``ce``, ``mse``).
        first_order: add the gradient term to fisher sensitivities.
        hawq_iterations: Hutchinson iterations for ``hawq``.
        batch_size: samples per pass in analysis and evaluation.
        finetune_epochs: 0 skips fine-tuning.
        finetune_steps: optimiser steps instead of epochs.
        finetune_lr, finetune_batch_size, val_fraction, patience: fine-tuning settings.
        eval_fraction: share of the data held out for evaluation when no eval data is given.
        output_key: which element of a tuple/dict model output to score.
        seed: every random choice (splits, sampled labels, probes).
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda`` (``cuda:N``).
    """

    budgets: list[str]
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    method: str = "fisher"
    pins: dict[str, int] = field(default_factory=dict)
    ties: list[str] = field(default_factory=list)
    solver: str = "auto"
    act_bits: int = 8
    quantize_activations: bool = False
    cost_table: dict[str, Any] | None = None
    loss: str = "auto"
    first_order: bool = False
    hawq_iterations: int = 200
    batch_size: int = 64
    finetune_epochs: int = 5
    finetune_steps: int | None = None
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 32
    val_fraction: float = 0.1
    patience: int = 3
    eval_fraction: float = 0.2
    output_key: str | int | None = None
    seed: int = 0
    device: str = "auto"

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
        _choice("method", self.method, _METHODS)
        _choice("solver", self.solver, _SOLVERS)
        _choice("loss", self.loss, _LOSSES)
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
        if self.first_order and self.method != "fisher":
            raise SpecError("first_order applies to method 'fisher' only")
        for name, lo, hi in (("val_fraction", 0.0, 0.9), ("eval_fraction", 0.0, 0.9)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise SpecError(f"{name} must be in [{lo}, {hi}], got {value}")
        for name in ("hawq_iterations", "batch_size", "finetune_batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise SpecError(f"{name} must be at least 1")
        if self.finetune_epochs < 0 or (
            self.finetune_steps is not None and self.finetune_steps < 0
        ):
            raise SpecError("finetune_epochs and finetune_steps must not be negative")
        if not self.finetune_lr > 0:
            raise SpecError("finetune_lr must be positive")

    def parsed_budgets(self) -> list[Budget]:
        return [
            parse_budget(text, act_bits=self.act_bits, table_layers=self.cost_table)
            for text in self.budgets
        ]

    @property
    def finetunes(self) -> bool:
        return (
            bool(self.finetune_steps)
            if self.finetune_steps is not None
            else self.finetune_epochs > 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "mpq.job_spec", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        if int(d.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise SpecError(
                f"job spec schema_version {d['schema_version']} is newer than this mpq reads"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"schema_version", "kind"})
        if unknown:
            raise SpecError(f"unknown job spec field(s): {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise SpecError(f"bad job spec: {exc}") from exc


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpecError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpecError(f"{what} pattern {pattern!r} is not a valid regex: {exc}") from exc
