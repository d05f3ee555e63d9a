"""The sensitivity table: Omega[layer][bits], the predicted loss rise of quantizing one layer.

Pure Python (no torch): written by ``mpq analyze``, read by ``mpq allocate`` and by the API to
re-solve a stored table for a new budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpq_core.errors import SpecError
from mpq_core.layers import LayerInfo
from mpq_core.scheme import QuantScheme

__all__ = ["SCHEMA_VERSION", "SensitivityTable"]

SCHEMA_VERSION = 1


@dataclass
class SensitivityTable:
    """Per-layer, per-bit-width sensitivities of one model on one calibration set.

    Attributes:
        method: ``fisher``, ``kl`` or ``hawq``.
        bits: candidate bit widths, ascending.
        layers: the quantizable layers, in model order.
        omega: ``omega[i][j]`` is the predicted loss increase of layer ``i`` at ``bits[j]``.
        float_params: parameters that stay in float32 (biases, norms, unquantized weights);
            they count towards the ``size`` and ``compression`` budgets.
        model_bytes: the model's size in its own dtype (the ``compression`` baseline); 0 when
            unknown (tables written before it was recorded: float32 is assumed).
        meta: free-form provenance (model sha256, format, samples, seconds, loss used).
        checkpoint_overhead_bytes: a bound on what the packed checkpoint adds to the cost model
            for this model (header and padding), so a re-solve without the model (``mpq
            allocate``, the API) holds ``size`` budgets on the file; None where not measured.
    """

    method: str
    bits: list[int]
    layers: list[LayerInfo]
    omega: list[list[float]]
    float_params: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    model_bytes: int = 0
    float_bytes: int | None = None  # bytes of float_params in the checkpoint (None: 4 each)
    checkpoint_overhead_bytes: int | None = None

    def __post_init__(self) -> None:
        if list(self.bits) != sorted(set(self.bits)):
            raise SpecError(f"bit widths must be distinct and ascending, got {self.bits}")
        if len(self.omega) != len(self.layers):
            raise SpecError("sensitivity table has a different number of rows and layers")
        for row in self.omega:
            if len(row) != len(self.bits):
                raise SpecError("every sensitivity row needs one value per bit width")

    @property
    def scheme(self) -> QuantScheme:
        """The quantizer scheme the errors were measured with (``meta["scheme"]``; tables
        from before schemes existed: per-channel symmetric)."""
        return QuantScheme.from_dict(self.meta.get("scheme"))

    @property
    def stored_float_bytes(self) -> int:
        """What the float parameters take in the packed checkpoint (4 bytes each unless the
        table recorded otherwise)."""
        return self.float_bytes if self.float_bytes is not None else 4 * self.float_params

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def row(self, name: str) -> dict[int, float]:
        i = self.names.index(name)
        return dict(zip(self.bits, self.omega[i], strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "mpq.sensitivity",
            "method": self.method,
            "bits": list(self.bits),
            "float_params": self.float_params,
            "model_bytes": self.model_bytes,
            "float_bytes": self.float_bytes,
            "checkpoint_overhead_bytes": self.checkpoint_overhead_bytes,
            "meta": self.meta,
            "layers": [
                {**layer.to_dict(), "omega": dict(zip(map(str, self.bits), row, strict=True))}
                for layer, row in zip(self.layers, self.omega, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityTable:
        if d.get("kind") != "mpq.sensitivity":
            raise SpecError("not an mpq sensitivity table (expected kind 'mpq.sensitivity')")
        if int(d.get("schema_version", 0)) > SCHEMA_VERSION:
            raise SpecError(
                f"sensitivity table schema_version {d.get('schema_version')} is newer than this "
                f"mpq understands ({SCHEMA_VERSION}); upgrade mpq"
            )
        bits = [int(b) for b in d["bits"]]
        layers = [LayerInfo.from_dict(row) for row in d["layers"]]
        omega = [[float(row["omega"][str(b)]) for b in bits] for row in d["layers"]]
        return cls(
            method=str(d["method"]),
            bits=bits,
            layers=layers,
            omega=omega,
            float_params=int(d.get("float_params", 0)),
            meta=dict(d.get("meta", {})),
            model_bytes=int(d.get("model_bytes", 0)),
            float_bytes=None if d.get("float_bytes") is None else int(d["float_bytes"]),
            checkpoint_overhead_bytes=(
                None
                if d.get("checkpoint_overhead_bytes") is None
                else int(d["checkpoint_overhead_bytes"])
            ),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read sensitivity table {path}: {exc}") from exc
        return cls.from_dict(data)
