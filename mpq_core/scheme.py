"""The weight quantizer's scheme: scale granularity and symmetric or asymmetric codes.

Pure Python (no torch): the costs of a scheme (``LayerInfo.storage_bits``, budgets) are read by
the API process too.

- ``group_size``: ``None`` for one scale per output channel; else one scale per output channel
  and per group of ``group_size`` consecutive input columns of the weight flattened to
  ``(out, in)`` (a convolution's ``Cin*k`` dimension). A layer whose input dimension is not a
  multiple of the group size, or not larger than it, falls back to one scale per channel.
- ``symmetric``: signed codes ``[-(2^(b-1)-1), 2^(b-1)-1]`` and no zero point; else unsigned
  codes ``0..2^b-1`` with one zero point per scale, stored as a byte (8 bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GROUP_SIZES", "ZERO_POINT_BITS", "QuantScheme"]

#: The group sizes a job may ask for.
GROUP_SIZES = (32, 64, 128)
#: Bits stored per zero point (one byte, whatever the width).
ZERO_POINT_BITS = 8
_SCALE_BITS = 16


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized (``QuantScheme()`` is per-channel symmetric, the default).

    Example:
        >>> QuantScheme(group_size=128).groups((4096, 4096))
        32
        >>> QuantScheme(group_size=128).groups((10, 100))  # not divisible: per channel
        1
    """

    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} or None")

    def groups(self, shape: tuple[int, ...] | list[int]) -> int:
        """Scales per output channel of a weight of ``shape`` (1: per channel)."""
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        g = self.group_size
        if g is None or cols <= g or cols % g:
            return 1
        return cols // g

    def scale_count(self, shape: tuple[int, ...] | list[int]) -> int:
        """Scales (and zero points, when asymmetric) stored for a weight of ``shape``."""
        return (shape[0] if shape else 1) * self.groups(shape)

    def storage_bits(self, shape: tuple[int, ...] | list[int], params: int, bits: int) -> int:
        """Bits of a weight at ``bits`` (2..8): codes, fp16 scales and zero points."""
        per_scale = _SCALE_BITS + (0 if self.symmetric else ZERO_POINT_BITS)
        return params * bits + self.scale_count(shape) * per_scale

    @property
    def is_default(self) -> bool:
        return self == QuantScheme()

    def to_dict(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantScheme:
        """The scheme a table or checkpoint recorded; absent (older files): the default."""
        if not d:
            return cls()
        g = d.get("group_size")
        return cls(group_size=None if g is None else int(g), symmetric=bool(d.get("symmetric")))
