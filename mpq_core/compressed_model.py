"""The compressed drop-in model (``model.compressed.pt2``): a torch.export program that stores
each quantized weight as its bit-packed codes and fp16 scales and dequantizes them in the program,
so the file shrinks by the allocation's ratio and still runs with stock torch and no mpq:

    >>> model = torch.export.load("model.compressed.pt2").module()  # doctest: +SKIP
    >>> logits = model(images)  # doctest: +SKIP

Its outputs equal the simulated quantized model's bit for bit: the program computes
``codes * scale`` in float32 as :func:`mpq_core.quant_primitives.dequantize` does.

It is written for both upload formats. A torch.export upload is re-exported around its own
program. A TorchScript upload is first converted to a torch.export program by torch's TorchScript
converter (``torch._export.converter``): what that converter cannot translate gets no compressed
model, and the job's report says why (the dequantized drop-in ``model.pt`` is written anyway).

The codes use :mod:`mpq_core.packing`'s layout (eight ``b``-bit fields in ``b`` bytes, least
significant bit first); the program decodes them with integer shifts and masks, once per call.
That decoding costs time on every call, measured in ``bench/bench_deploy.py``: the file is for
shipping; a runtime that keeps weights unpacked in memory (``model.pt``, ONNX) runs faster.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq_core.atomic_write import file_target, write_atomic
from mpq_core.intake import LoadedModel
from mpq_core.packing import pack_codes
from mpq_core.program_convert import ConversionRefused, batch_dynamic_shapes, program_module
from mpq_core.quant_primitives import FLOAT_BITS, output_major
from mpq_core.quantized_weights import QuantizedLayer

__all__ = ["COMPRESSED_NAME", "CompressionRefused", "save_compressed_model", "unpack_in_program"]

COMPRESSED_NAME = "model.compressed.pt2"


class CompressionRefused(Exception):
    """The model could not be written as a compressed program; the message says why."""


def unpack_in_program(packed: torch.Tensor, bits: int, count: int, *, signed: bool) -> torch.Tensor:
    """The first ``count`` codes of a :func:`mpq_core.packing.pack_codes` stream, as ``int32``,
    with torch operations that torch.export records (no numpy, no loops over the data).

    ``packed`` must hold whole groups of eight fields: a multiple of ``bits`` bytes
    (:func:`_padded` pads it).
    """
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 2, 4 and 8 bits: whole fields in each byte, lowest bits first
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
        fields = (packed.to(torch.int32)[:, None] >> shifts) & mask
    else:  # 3, 5, 6 and 7 bits: eight fields span ``bits`` bytes, read as one 64-bit word
        lanes = packed.reshape(-1, bits).to(torch.int64)
        byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
        # The bytes occupy disjoint bits, so their sum is their bitwise or (wrapping past the
        # sign bit at 8 bytes changes no bit).
        words = (lanes << byte_shifts).sum(dim=1)
        shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
        fields = ((words[:, None] >> shifts) & mask).to(torch.int32)
    codes = fields.reshape(-1)[:count]
    return codes - ((1 << (bits - 1)) - 1) if signed else codes


def _padded(layer: QuantizedLayer) -> torch.Tensor:
    """The layer's packed codes, padded with zero bytes to whole groups of eight fields."""
    signed = layer.zeros is None
    packed = pack_codes(layer.codes.numpy(), layer.bits, signed=signed)
    group = 1 if 8 % layer.bits == 0 else layer.bits
    pad = -packed.size % group
    out = torch.zeros(packed.size + pad, dtype=torch.uint8)
    out[: packed.size] = torch.from_numpy(packed)
    return out


@dataclass(frozen=True)
class _Stored:
    """How one quantized weight is stored in the program (plain values, constants to export)."""

    aliases: tuple[str, ...]  # every name the inner module uses the weight under
    bits: int
    codes_shape: tuple[int, ...]  # output channels first
    transposed: bool
    dtype: torch.dtype  # the parameter's
    signed: bool


class _Decompressing(nn.Module):
    """``inner`` with its quantized weights rebuilt from packed codes on every call."""

    def __init__(
        self, inner: nn.Module, layers: Sequence[QuantizedLayer], aliases: dict[str, list[str]]
    ) -> None:
        super().__init__()
        weights = _weights_of(inner)
        self.stored: list[_Stored] = []
        for i, layer in enumerate(layers):
            names = tuple(aliases[layer.name])
            dtype = weights[names[0]].dtype
            if layer.bits == FLOAT_BITS:
                self.register_buffer(f"w{i}", layer.codes.clone())
            else:
                self.register_buffer(f"q{i}", _padded(layer))
                self.register_buffer(f"s{i}", layer.scales.to(torch.float16))
                if layer.zeros is not None:
                    self.register_buffer(f"z{i}", layer.zeros.clone())
            codes_shape = tuple(layer.codes.shape)
            self.stored.append(
                _Stored(
                    names, layer.bits, codes_shape, layer.transposed, dtype, layer.zeros is None
                )
            )
            for name in names:  # the program must not keep the float weight beside the codes
                owner, _, leaf = name.rpartition(".")
                held = inner.get_submodule(owner)
                held._parameters.pop(leaf, None)
                held._buffers.pop(leaf, None)
        self.inner = inner

    def _weight(self, i: int, s: _Stored) -> torch.Tensor:
        if s.bits == FLOAT_BITS:
            return getattr(self, f"w{i}").to(s.dtype)
        count = math.prod(s.codes_shape)
        codes = unpack_in_program(getattr(self, f"q{i}"), s.bits, count, signed=s.signed)
        scales = getattr(self, f"s{i}").float().reshape(-1)
        rows = codes.reshape(scales.numel(), -1).float()
        if not s.signed:
            rows = rows - getattr(self, f"z{i}").float().reshape(-1)[:, None]
        w = (rows * scales[:, None]).reshape(s.codes_shape).to(s.dtype)
        return output_major(w, s.transposed)

    def forward(self, *args: Any) -> Any:
        weights: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.stored):
            w = self._weight(i, s)
            weights.update(dict.fromkeys(s.aliases, w))
        return torch.func.functional_call(self.inner, weights, args)


def _weights_of(inner: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``inner`` by each name it goes by. torch's TorchScript converter lifts a
    model's parameters as buffers, hence both."""
    return {
        **dict(inner.named_buffers(remove_duplicate=False)),
        **dict(inner.named_parameters(remove_duplicate=False)),
    }


def _aliases(inner: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Every name each layer's weight goes by in ``inner`` (tied weights have several)."""
    weights = _weights_of(inner)
    by_tensor: dict[int, list[str]] = {}
    for name, t in weights.items():
        by_tensor.setdefault(id(t), []).append(name)
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in weights:
            raise CompressionRefused(f"the exported program has no weight named {name!r}")
        out[name] = by_tensor[id(weights[name])]
    return out


def _drop_own_stack_traces(program: Any) -> None:
    """Forget where in mpq the decoding nodes were recorded: a stack trace per node would be
    about a third of the program's size, and it names paths on the machine that wrote it."""
    for node in program.graph.nodes:
        trace = node.meta.get("stack_trace")
        if trace and "mpq_core" in trace:
            del node.meta["stack_trace"]


def _save_quietly(program: Any, out: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(program, out)


def save_compressed_model(
    model: LoadedModel,
    layers: dict[str, QuantizedLayer],
    example: Sequence[torch.Tensor],
    path: str | Path,
) -> Path:
    """Write ``model.compressed.pt2``: the model as a torch.export program holding packed codes.

    Args:
        model: the quantized job's model (its other parameters are stored as they are).
        layers: the quantized layers.
        example: one batch of inputs, to record the program with (the batch dimension stays
            dynamic where the model allows it).
        path: the file, or a directory to write :data:`COMPRESSED_NAME` into.

    Returns:
        The file written.

    Raises:
        CompressionRefused: the model cannot be recorded as a torch.export program (the
            message says why); nothing is written.
    """
    inputs = tuple(t.detach().to("cpu") for t in example)
    try:
        inner = program_module(model, inputs)
    except ConversionRefused as exc:
        raise CompressionRefused(str(exc)) from exc
    ordered = [layers[name] for name in sorted(layers)]
    wrapper = _Decompressing(inner, ordered, _aliases(inner, [la.name for la in ordered]))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            shapes = batch_dynamic_shapes(inputs, model.fixed_batch is not None)
            program = torch.export.export(wrapper, inputs, dynamic_shapes=shapes)
    except Exception as exc:
        raise CompressionRefused(
            f"torch.export could not record the model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    _drop_own_stack_traces(program)
    program.example_inputs = None  # the file need not carry a batch of the user's data
    target = file_target(path, COMPRESSED_NAME)
    write_atomic(target, lambda out: _save_quietly(program, out))
    return target
