"""Plain description of a quantizable layer; shared by profiling, sensitivities and budgets.

Pure Python (no torch) so the API process can read stored tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from mpq_core.scheme import QuantScheme

__all__ = ["FLOAT_BITS", "LayerInfo", "transposed_names"]

#: The candidate width that keeps a layer unquantized, stored as a 16-bit float (float16, or
#: bfloat16 for a bfloat16 weight): ``params * 16`` bits, no scales.
FLOAT_BITS = 16


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight tensor.

    Attributes:
        name: the parameter's qualified name in the model (``features.0.weight``).
        kind: ``conv1d|conv2d|conv3d|linear|embedding|rnn``.
        shape: the weight's shape as stored; dim 0 is the output channel, or dim 1 for a weight
            stored ``(in, out, ...)`` (``extra["transposed"]``: GPT-2's ``Conv1D``, transposed
            convolutions).
        params: number of elements of the weight.
        channels: number of output channels, i.e. of fp16 scales stored with it per channel.
        macs: multiply-accumulates per sample from a real forward pass (0 for embeddings).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    channels: int
    macs: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(in, out, ...)``: its scales follow dim 1."""
        return bool(self.extra.get("transposed"))

    @property
    def quant_shape(self) -> tuple[int, ...]:
        """The shape the quantizer sees: output channels first, then what they sum over."""
        if self.transposed and len(self.shape) >= 2:
            return (self.shape[1], self.shape[0], *self.shape[2:])
        return self.shape

    def storage_bits(self, bits: int, scheme: QuantScheme | None = None) -> int:
        """Bits to store this layer at ``bits``: codes plus the scheme's fp16 scales (one per
        output channel by default) and zero points; at ``FLOAT_BITS`` the 16-bit weight alone."""
        if bits == FLOAT_BITS:
            return self.params * FLOAT_BITS
        if scheme is None or scheme.is_default:
            return self.params * bits + self.channels * 16
        return scheme.storage_bits(self.quant_shape, self.params, bits)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not d["extra"]:
            del d["extra"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            shape=tuple(int(s) for s in d["shape"]),
            params=int(d["params"]),
            channels=int(d["channels"]),
            macs=int(d["macs"]),
            extra=dict(d.get("extra", {})),
        )


def transposed_names(layers: Iterable[LayerInfo]) -> frozenset[str]:
    """The layers whose weights are stored ``(in, out, ...)``, for the quantizer functions."""
    return frozenset(layer.name for layer in layers if layer.transposed)
