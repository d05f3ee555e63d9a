"""The quantized weights of a model: integer codes and fp16 scales per layer.

``quantize_weights`` turns an allocation (bits per layer) into codes and scales,
``apply_weights`` writes their dequantized values into the model (the simulated quantized model),
and ``mpq_core.packed_checkpoint`` stores them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from mpq_core.intake import LoadedModel
from mpq_core.quant_primitives import (
    FLOAT_BITS,
    choose_params_many,
    dequantize,
    float16_dtype,
    output_major,
    qmax,
    quantize,
    round_to_float16,
)
from mpq_core.scheme import QuantScheme

__all__ = ["QuantizedLayer", "apply_weights", "model_parameters", "quantize_weights"]


@dataclass
class QuantizedLayer:
    """One quantized weight.

    Attributes:
        name: the parameter's qualified name in the model.
        bits: 2..8, or ``FLOAT_BITS`` (16) for a layer kept as a 16-bit float.
        codes: ``int8`` codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``, output channels first (the
            weight's shape, or dims 0 and 1 swapped when ``transposed``); at 16 bits the weight
            itself, as stored, as float16 (bfloat16 for a bfloat16 model).
        scales: ``float32`` scales, fp16-representable, one per output channel (dim 0 of the
            codes), or ``(channels, groups)`` with group-wise scales; empty at 16 bits.
        zeros: asymmetric codes' zero points (``uint8``, the scales' shape; the codes are then
            ``uint8`` in ``0..2^b-1``), None for symmetric codes.
        transposed: the parameter is stored ``(in, out, ...)`` (GPT-2's ``Conv1D``, a
            transposed convolution): the codes are its transpose, so that scales and groups
            follow its output channels and input dimension.
    """

    name: str
    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape."""
        return tuple(output_major(self.codes, self.transposed).shape)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the quantized model uses, in the parameter's layout:
        ``quantizer.dequantize(codes, scales)``."""
        if self.bits == FLOAT_BITS:
            return self.codes.to(dtype)
        w = dequantize(self.codes, self.scales, dtype=dtype, zeros=self.zeros)
        return output_major(w, self.transposed)


def model_parameters(model: LoadedModel) -> dict[str, torch.Tensor]:
    """Every parameter of the model by qualified name, aliases of tied weights included."""
    params: dict[str, torch.Tensor] = dict(model.module.named_parameters())
    for name, p in model.named_weights().items():
        params.setdefault(name, p)
    return params


def _fp16_scales(name: str, scales: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    s = scales.detach().to(device="cpu", dtype=torch.float32)
    if s.shape != shape:
        raise ValueError(f"layer {name!r}: scales of shape {tuple(s.shape)} given, {shape} needed")
    # Round to fp16 (how the checkpoint stores them) so the packed model stays bit-exact.
    s = s.half().float()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"layer {name!r}: scales must be positive and fit in fp16")
    return s


def quantize_weights(
    model: LoadedModel,
    bits_by_layer: dict[str, int],
    *,
    scales: dict[str, torch.Tensor] | None = None,
    zeros: dict[str, torch.Tensor | None] | None = None,
    scheme: QuantScheme | None = None,
    transposed: Collection[str] = (),
) -> dict[str, QuantizedLayer]:
    """Codes and scales of each named layer at its bit width.

    Args:
        model: the model whose current weights are quantized.
        bits_by_layer: parameter name -> bits (2..8, or 16 to keep the layer as a 16-bit float).
        scales: per-layer scales to use instead of the MSE-chosen ones
            (``quantizer.choose_params_many``); rounded to fp16.
        zeros: with ``scales`` and an asymmetric scheme, the layers' zero points.
        scheme: scale granularity and symmetry (per-channel symmetric when None).
        transposed: the layers stored ``(in, out, ...)`` (``transposed_names(profile.layers)``):
            their scales follow dim 1.

    Raises:
        KeyError: a layer name that is not a parameter of the model.
        ValueError: bits outside 2..8, a weight with no dimensions, or scales of the wrong size.

    Example:
        >>> layers = quantize_weights(model, {"fc.weight": 4})  # doctest: +SKIP
        >>> layers["fc.weight"].codes.dtype
        torch.int8
    """
    params = model_parameters(model)
    out: dict[str, QuantizedLayer] = {}
    for name, bits in bits_by_layer.items():
        if name not in params:
            raise KeyError(f"the model has no parameter named {name!r}")
        if bits != FLOAT_BITS:
            qmax(bits)  # validates the width
        w = params[name].detach().to("cpu")
        if w.dim() == 0 or w.numel() == 0:
            raise ValueError(f"parameter {name!r} of shape {tuple(w.shape)} cannot be quantized")
        if bits == FLOAT_BITS:
            half = round_to_float16(w).to(float16_dtype(w.dtype))
            out[name] = QuantizedLayer(name, FLOAT_BITS, half, torch.zeros(0))
            continue
        given = None if scales is None else scales.get(name)
        flip = name in transposed
        w = output_major(w, flip)  # output channels first: scales follow them
        out[name] = _quantized(name, w, int(bits), scheme or QuantScheme(), given, zeros, flip)
    return out


def _quantized(
    name: str,
    w: torch.Tensor,
    bits: int,
    scheme: QuantScheme,
    given: torch.Tensor | None,
    zeros: dict[str, torch.Tensor | None] | None,
    transposed: bool,
) -> QuantizedLayer:
    """One layer's codes on its chosen (or given) scales and zero points; ``w`` output
    channels first."""
    found, found_zeros = choose_params_many(w, [bits], scheme) if given is None else (None, None)
    if found is not None:
        s, z = found[0], None if found_zeros is None else found_zeros[0]
    else:
        groups = scheme.groups(tuple(w.shape))
        shape = (w.shape[0],) if groups == 1 else (w.shape[0], groups)
        assert given is not None
        s = _fp16_scales(name, given, shape)
        z = None if zeros is None else zeros.get(name)
        if (z is None) != scheme.symmetric:
            raise ValueError(f"layer {name!r}: zero points go with asymmetric codes only")
    zq = None if z is None else z.detach().to("cpu", torch.uint8)
    codes = quantize(w, s, bits, zq)
    return QuantizedLayer(name, bits, codes, s, zq, transposed)


def apply_weights(model: LoadedModel, layers: dict[str, QuantizedLayer]) -> None:
    """Write each layer's dequantized weight into the model's parameter, in place.

    The parameter keeps its dtype and device (the float32 dequantized value is cast to them). A
    torch.export model's program shares the storage, so ``model.save`` writes the new weights.

    Raises:
        KeyError: a layer the model has no parameter for.
        ValueError: a layer whose shape differs from its parameter's.
    """
    params = model_parameters(model)
    with torch.no_grad():
        for name, layer in layers.items():
            p = params.get(name)
            if p is None:
                raise KeyError(f"the model has no parameter named {name!r}")
            if tuple(p.shape) != layer.shape:
                raise ValueError(
                    f"layer {name!r}: codes of shape {layer.shape} do not fit the parameter "
                    f"of shape {tuple(p.shape)}"
                )
            p.copy_(layer.dequantized())
