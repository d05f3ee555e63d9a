"""Budgets and the cost model: what a bit allocation may spend, and what each choice costs.

Pure Python + numpy (no torch), so the API process can parse budgets and re-solve stored tables.

Budget kinds (DESIGN.md "Quantities"):

- ``avg-bits=3``: parameter-weighted mean bit width over the quantized layers.
- ``size=1.5MB``: bytes of all weights, quantized layers packed (codes + one fp16 scale per output
  channel; a layer kept at 16 bits: its 16-bit weight) plus every float parameter at 4 bytes. Units B, KB, MB, GB, TB (powers of 1000),
  KiB, MiB, GiB, TiB (powers of 1024); a bare number is bytes.
- ``compression=8`` or ``8x``: the model's own size (in its dtype: float32, or 2 bytes a
  parameter for a bfloat16/float16 model) over the quantized size, at least this.
- ``bitops=1.2e9`` or ``1.2G``: sum over layers of MACs * weight bits * activation bits.
- ``table=12.5``: any additive per-layer, per-bit cost from a user JSON (e.g. measured latency),
  given with ``--cost-table FILE``: ``{"schema_version": 1, "layers": {name: {"4": cost, ...}}}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mpq_core.errors import BudgetError
from mpq_core.layers import LayerInfo
from mpq_core.scheme import QuantScheme

__all__ = [
    "BUDGET_KINDS",
    "COST_TABLE_SCHEMA_VERSION",
    "Budget",
    "CostTable",
    "achieved",
    "budget_constraint",
    "format_value",
    "load_cost_table",
    "parse_budget",
]

BUDGET_KINDS: tuple[str, ...] = ("avg-bits", "size", "compression", "bitops", "table")
COST_TABLE_SCHEMA_VERSION = 1

CostTable = dict[str, dict[int, float]]

_FORMS = (
    "accepted forms: avg-bits=3, size=1.5MB (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; a bare "
    "number is bytes), compression=8 or compression=8x, bitops=1.2e9 or bitops=1.2G "
    "(K, M, G, T), table=VALUE with --cost-table FILE"
)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_COUNT_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"


@dataclass(frozen=True)
class Budget:
    """One limit on the allocation.

    Attributes:
        kind: one of :data:`BUDGET_KINDS`.
        value: the limit, in the kind's unit (bits, bytes, ratio, bit-operations, table units);
            an upper bound on cost, except ``compression``, a lower bound on the ratio.
        act_bits: activation bits, used by ``bitops`` only.
        table: ``table[layer][bits]`` per-layer costs, used by ``table`` only.

    Example:
        >>> Budget.from_dict(Budget("size", 1.5e6).to_dict()) == Budget("size", 1.5e6)
        True
    """

    kind: str
    value: float
    act_bits: int = 8
    table: CostTable | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"unknown budget kind {self.kind!r}; {_FORMS}")
        if not math.isfinite(self.value):
            raise BudgetError(f"budget {self.kind} needs a finite value, got {self.value}")
        if self.kind != "table" and self.value <= 0:
            raise BudgetError(f"budget {self.kind} must be positive, got {self.value}")
        if self.kind == "bitops" and not 1 <= self.act_bits <= 32:
            raise BudgetError(f"activation bits must be in 1..32, got {self.act_bits}")
        if self.kind == "table" and self.table is None:
            raise BudgetError("a table budget needs a cost table (--cost-table FILE)")

    @property
    def unit(self) -> str:
        return {
            "avg-bits": "bits",
            "size": "bytes",
            "compression": "x",
            "bitops": "bitops",
            "table": "table units",
        }[self.kind]

    def label(self) -> str:
        """The budget as the user would write it, e.g. ``size=1.5 MB``."""
        return f"{self.kind}={format_value(self.kind, self.value)}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.kind == "bitops":
            d["act_bits"] = self.act_bits
        if self.table is not None:
            d["table"] = {
                name: {str(b): c for b, c in row.items()} for name, row in self.table.items()
            }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        try:
            table = d.get("table")
            return cls(
                kind=str(d["kind"]),
                value=float(d["value"]),
                act_bits=int(d.get("act_bits", 8)),
                table=None if table is None else _table_from_json(table, "budget"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BudgetError(f"malformed budget {d!r}: {exc}") from exc


def format_value(kind: str, value: float) -> str:
    """Render a budget value in its unit: ``14.2 KB``, ``3.25 bits``, ``7.6x``, ``1.2e+09``."""
    if kind == "size":
        for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {unit}"
        return f"{value:.4g} B"
    if kind == "avg-bits":
        return f"{value:.4g} bits"
    if kind == "compression":
        return f"{value:.4g}x"
    return f"{value:.4g}"


def _bad(text: str, why: str) -> BudgetError:
    return BudgetError(f"cannot read budget {text!r}: {why}; {_FORMS}")


def _number(text: str, raw: str, suffixes: dict[str, float] | dict[str, int]) -> float:
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", raw.strip())
    if not m:
        raise _bad(text, f"{raw!r} is not a number")
    unit = m.group(2).lower()
    if unit not in suffixes:
        raise _bad(text, f"unknown unit {m.group(2)!r}")
    return float(m.group(1)) * suffixes[unit]


def parse_bytes(raw: str) -> float:
    """``"8GB"`` -> ``8e9``, ``"1.5GiB"`` -> ``1610612736.0``: a size with the units budgets use.

    Raises:
        ValueError: not a number with one of those units.
    """
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", raw.strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{raw[:40]!r} is not a size like 8GB or 512MiB")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_budget(
    text: str,
    *,
    act_bits: int = 8,
    table_path: str | None = None,
    table_layers: dict[str, Any] | None = None,
) -> Budget:
    """Parse a ``KIND=VALUE`` budget as written on the command line.

    Args:
        text: e.g. ``avg-bits=3``, ``size=1.5MB``, ``compression=8x``, ``bitops=1.2G``,
            ``table=12.5``.
        act_bits: activation bits for ``bitops``.
        table_path: the cost table JSON a ``table`` budget refers to.
        table_layers: or the table's ``layers`` object itself (a job spec carries it inline).

    Raises:
        BudgetError: malformed text, with the accepted forms in the message.

    Example:
        >>> parse_budget("size=1.5MB").value
        1500000.0
    """
    kind, sep, raw = text.partition("=")
    kind = kind.strip().lower().replace("_", "-")
    if not sep or not raw.strip():
        raise _bad(text, "expected KIND=VALUE")
    if kind not in BUDGET_KINDS:
        raise _bad(text, f"unknown kind {kind!r}")
    if kind == "size":
        value = _number(text, raw, _SIZE_UNITS)
    elif kind == "compression":
        value = _number(text, raw, {"": 1.0, "x": 1.0})
    elif kind == "bitops":
        value = _number(text, raw, _COUNT_SUFFIXES)
    else:
        value = _number(text, raw, {"": 1.0})
    table = None
    if kind == "table":
        if table_layers is not None:
            table = _table_from_json(table_layers, "cost table")
        elif table_path is not None:
            table = load_cost_table(table_path)
        else:
            raise _bad(text, "a table budget needs --cost-table FILE")
    if not math.isfinite(value) or (kind != "table" and value <= 0):
        raise _bad(text, "the value must be a positive finite number")
    return Budget(kind=kind, value=value, act_bits=act_bits, table=table)


def _table_from_json(layers: Any, where: str) -> CostTable:
    if not isinstance(layers, dict):
        raise BudgetError(f"{where}: 'layers' must map layer names to {{bits: cost}}")
    out: CostTable = {}
    for name, row in layers.items():
        if not isinstance(row, dict):
            raise BudgetError(f"{where}: layer {name!r} must map bit widths to costs")
        parsed: dict[int, float] = {}
        for b, c in row.items():
            try:
                bits, cost = int(b), float(c)
            except (TypeError, ValueError) as exc:
                raise BudgetError(f"{where}: layer {name!r} has a bad entry {b!r}: {c!r}") from exc
            if not math.isfinite(cost):
                raise BudgetError(f"{where}: layer {name!r} at {bits} bits has cost {cost}")
            parsed[bits] = cost
        out[str(name)] = parsed
    return out


def load_cost_table(path: str | Path) -> CostTable:
    """Read a per-layer, per-bit cost table for ``table`` budgets.

    The file is JSON: ``{"schema_version": 1, "layers": {"fc.weight": {"2": 0.4, "4": 0.6}}}``.

    Raises:
        BudgetError: unreadable file, newer schema, or malformed entries.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BudgetError(f"cannot read cost table {path}: {exc}") from exc
    if not isinstance(data, dict) or "layers" not in data:
        raise BudgetError(f"cost table {path} needs a 'layers' object")
    version = data.get("schema_version", COST_TABLE_SCHEMA_VERSION)
    if not isinstance(version, int) or version > COST_TABLE_SCHEMA_VERSION:
        raise BudgetError(
            f"cost table {path} has schema_version {version!r}; this mpq reads "
            f"{COST_TABLE_SCHEMA_VERSION}"
        )
    return _table_from_json(data["layers"], f"cost table {path}")


def _model_bytes(
    layers: Sequence[LayerInfo], float_params: int, model_bytes: float | None
) -> float:
    """The model's own size, the baseline of ``compression``: as measured in its dtype (a
    bfloat16 model is 2 bytes a parameter), or float32 where it was not recorded."""
    if model_bytes:
        return float(model_bytes)
    return 4.0 * (sum(layer.params for layer in layers) + float_params)


def _float_bytes(float_params: int, float_bytes: float | None) -> float:
    return 4.0 * float_params if float_bytes is None else float(float_bytes)


def budget_constraint(
    budget: Budget,
    layers: Sequence[LayerInfo],
    bits: Sequence[int],
    *,
    float_params: int = 0,
    model_bytes: float | None = None,
    float_bytes: float | None = None,
    scheme: QuantScheme | None = None,
) -> tuple[NDArray[np.float64], float]:
    """The budget as a knapsack constraint: ``sum_i costs[i][choice_i] <= capacity``.

    Args:
        budget: the budget.
        layers: the quantizable layers.
        bits: candidate bit widths (the columns).
        float_params: parameters kept in float (stored as float32: count towards ``size`` and
            ``compression``).
        model_bytes: the model's size in its own dtype, the baseline of ``compression``
            (float32 of every parameter when None).
        float_bytes: what the float parameters take in the packed checkpoint (4 bytes each
            when None; 2 for a model whose float parameters are all float16 or bfloat16).
        scheme: the quantizer's scheme (its scales and zero points count towards ``size`` and
            ``compression``); per-channel symmetric when None.

    Returns:
        ``(costs, capacity)`` with ``costs`` of shape ``(len(layers), len(bits))``.

    Raises:
        BudgetError: a ``table`` budget's table lacks a layer or a bit width.

    Example:
        >>> fc = LayerInfo("fc.weight", "linear", (10, 10), 100, 10, 100)
        >>> costs, cap = budget_constraint(Budget("avg-bits", 4), [fc], [2, 4])
        >>> costs.tolist(), cap
        ([[200.0, 400.0]], 400.0)
    """
    b = np.asarray(bits, dtype=np.float64)[None, :]
    params = np.array([layer.params for layer in layers], dtype=np.float64)[:, None]
    if budget.kind == "avg-bits":
        return params * b, budget.value * float(params.sum())
    if budget.kind in ("size", "compression"):
        packed = np.array(
            [[layer.storage_bits(int(bw), scheme) / 8.0 for bw in bits] for layer in layers],
            dtype=np.float64,
        ).reshape(len(layers), len(bits))
        total = budget.value
        if budget.kind == "compression":
            total = _model_bytes(layers, float_params, model_bytes) / budget.value
        return packed, total - _float_bytes(float_params, float_bytes)
    if budget.kind == "bitops":
        macs = np.array([layer.macs for layer in layers], dtype=np.float64)[:, None]
        return macs * b * float(budget.act_bits), budget.value
    assert budget.table is not None
    costs = np.empty((len(layers), len(bits)))
    for i, layer in enumerate(layers):
        row = budget.table.get(layer.name)
        if row is None:
            raise BudgetError(f"the cost table has no entry for layer {layer.name!r}")
        for j, bw in enumerate(bits):
            if bw not in row:
                raise BudgetError(
                    f"the cost table has no cost for layer {layer.name!r} at {bw} bits"
                )
            costs[i, j] = row[bw]
    return costs, budget.value


def achieved(
    budget: Budget,
    layers: Sequence[LayerInfo],
    float_params: int,
    chosen_bits: Sequence[int],
    *,
    model_bytes: float | None = None,
    float_bytes: float | None = None,
    scheme: QuantScheme | None = None,
) -> float:
    """What an allocation reaches in the budget's own unit (avg bits, bytes, ratio, ...),
    with the sizes of ``scheme`` (per-channel symmetric when None).

    Example:
        >>> fc = LayerInfo("fc.weight", "linear", (10, 10), 100, 10, 100)
        >>> round(achieved(Budget("compression", 4), [fc], 0, [8]), 3)
        3.333
    """
    if len(chosen_bits) != len(layers):
        raise BudgetError("one chosen bit width per layer is needed")
    if budget.kind == "avg-bits":
        total = sum(layer.params for layer in layers)
        bits_sum = sum(layer.params * b for layer, b in zip(layers, chosen_bits, strict=True))
        return bits_sum / total if total else 0.0
    if budget.kind in ("size", "compression"):
        packed = sum(
            layer.storage_bits(b, scheme) for layer, b in zip(layers, chosen_bits, strict=True)
        )
        size = packed / 8.0 + _float_bytes(float_params, float_bytes)
        if budget.kind == "size":
            return size
        return _model_bytes(layers, float_params, model_bytes) / size if size else math.inf
    if budget.kind == "bitops":
        return float(
            sum(
                layer.macs * b * budget.act_bits
                for layer, b in zip(layers, chosen_bits, strict=True)
            )
        )
    assert budget.table is not None
    total_cost = 0.0
    for layer, b in zip(layers, chosen_bits, strict=True):
        try:
            total_cost += budget.table[layer.name][b]
        except KeyError as exc:
            raise BudgetError(
                f"the cost table has no cost for layer {layer.name!r} at {b} bits"
            ) from exc
    return total_cost
