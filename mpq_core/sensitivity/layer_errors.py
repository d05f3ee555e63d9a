"""The quantization errors ``Q_b(W_l) - W_l`` of a model's layers, one layer at a time.

Holding every layer's errors at every candidate width costs ``4 * len(bits)`` bytes a parameter
(3 GB for a 125M-parameter model at six widths, 168 GB at 7B), so the sensitivity passes ask
for one layer's stack at a time: each layer's scales are chosen once up front (the clipping
search; ``len(bits) * channels`` floats), and a layer's stack is rebuilt from them on demand (one
quantize/dequantize per width) into one buffer that every layer shares.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from mpq_core.quant_primitives import choose_params_many, errors_from_scales, output_major
from mpq_core.scheme import QuantScheme

__all__ = ["LayerErrors"]


class LayerErrors:
    """``errors[name]`` is ``Q_b(W) - W`` stacked over ``bits``, ``(len(bits), *W.shape)``, in
    ``dtype``: float32 by default (exact for 16-bit weights), bfloat16 where the caller
    contracts in it (the Fisher pass on a bfloat16 model; half the buffer).

    The layers named in ``transposed`` store their weights ``(in, out, ...)``: they are
    quantized with scales along dim 1 (their output channels), and their stacks are still in
    the stored layout (a transposed view of the buffer).

    The stack returned for one layer lives in a buffer shared by all layers: it stays valid
    until a different layer is asked for, and a caller that needs it longer must copy it. So
    at most one layer's stack (the largest layer's size) is ever held, whatever the caller
    keeps referenced. Asking for the same layer again returns the same stack without work.

    Example:
        >>> errors = LayerErrors(model.named_weights(), ["fc.weight"], [2, 4])  # doctest: +SKIP
        >>> errors["fc.weight"].shape[0]  # doctest: +SKIP
        2
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        names: list[str],
        bits: list[int],
        scheme: QuantScheme | None = None,
        transposed: Collection[str] = (),
        *,
        dtype: torch.dtype = torch.float32,
    ):
        self._weights = {name: output_major(weights[name], name in transposed) for name in names}
        self._transposed = frozenset(transposed)
        self._bits = list(bits)
        self._dtype = dtype
        scheme = scheme or QuantScheme()
        # Chosen once, on the weights as they are now (a finite-difference pass perturbs them
        # later; the errors must stay those of the unperturbed weights).
        self._params = {
            name: choose_params_many(w, self._bits, scheme) for name, w in self._weights.items()
        }
        self._buffer: torch.Tensor | None = None
        self._name: str | None = None
        self._stack: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == self._name and self._stack is not None:
            return self._stack
        w = self._weights[name]
        shape = (len(self._bits), *w.shape)
        out = self._buffer_for(w, shape).view(shape)
        self._name = None  # the buffer is being overwritten
        scales, zeros = self._params[name]
        stack = errors_from_scales(w, self._bits, scales, zeros=zeros, out=out)
        # Back to the stored layout: dims 1 and 2 of the stack are the weight's dims 0 and 1.
        self._stack = stack.transpose(1, 2) if name in self._transposed else stack
        self._name = name
        return self._stack

    def _buffer_for(self, w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The shared buffer's first ``prod(shape)`` elements, (re)allocated when too small or
        on another device; sized for the largest layer at once.

        In the dtype the contractions read: converting a stack for every op that uses the
        layer cost a quarter of a bfloat16 1B decoder's analysis (the memory plan counts 4
        bytes a value)."""
        size = len(self._bits) * w.numel()
        buf = self._buffer
        if buf is None or buf.device != w.device or buf.numel() < size:
            self._buffer = buf = None  # drop the old one before allocating the next
            self._stack = None
            largest = max(p.numel() for p in self._weights.values()) * len(self._bits)
            buf = self._buffer = torch.empty(largest, dtype=self._dtype, device=w.device)
        return buf[:size]
