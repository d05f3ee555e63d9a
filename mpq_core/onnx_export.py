"""The ONNX model (``model.onnx``): the quantized model for ONNX runtimes, each quantized weight
stored as integer codes with per-channel (or per-group) scales behind a ``DequantizeLinear``.

How it is made: the model, holding its dequantized weights, is exported by torch's own ONNX
exporter (a torch.export upload through ``torch.onnx.export(program, dynamo=True)``, a
TorchScript upload through the TorchScript exporter). Every initializer equal to a quantized
layer's dequantized weight (or its transpose, where the exporter folded one) is then replaced by
the layer's codes and scales and a ``DequantizeLinear`` computing it, so the runtime sees the
same weight: ``(codes - zero) * scale`` in float32, as :func:`mpq_core.quant_primitives.dequantize`
computes it, cast to the model's dtype.

Containers (ONNX opset 25): 2-bit codes as ``int2``, 3- and 4-bit as ``int4``, 5- to 8-bit as
``int8`` (``uint*`` for asymmetric codes); a code never leaves its own range, so a 3-bit code in
an ``int4`` is range-restricted, not rescaled. A layer kept at 16 bits is stored as float16
(bfloat16) with a ``Cast``. Where the graph cannot be raised to opset 25, it is raised to 21 and
2-bit codes go into ``int4``.

A weight the exporter did not store as an initializer (e.g. folded into another constant), or
whose group-wise scales ONNX's blocked quantization cannot express (weights of more than two
dimensions), stays in float: :class:`OnnxExport` lists them, and the job's report says so.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from mpq_core.actquant import ActEncoding
from mpq_core.atomic_write import file_target, write_atomic
from mpq_core.intake import LoadedModel
from mpq_core.onnx_activations import add_activation_qdq
from mpq_core.program_convert import (
    ConversionRefused,
    Positional,
    batch_dynamic_shapes,
    program_module,
)
from mpq_core.quant_primitives import FLOAT_BITS, output_major
from mpq_core.quantized_weights import QuantizedLayer, model_parameters

__all__ = ["ONNX_NAME", "OnnxExport", "OnnxRefused", "input_names", "save_onnx_model"]

ONNX_NAME = "model.onnx"
_OPSET = 25  # int2 / uint2 in DequantizeLinear
_OPSET_NO_INT2 = 21  # int4 / uint4 and blocked scales
_TORCHSCRIPT_OPSET = 20  # the highest the TorchScript exporter writes
# protobuf's 2 GB limit on one message, less room for the graph and the codes beside the floats.
_PROTO_LIMIT = 1_800_000_000


class OnnxRefused(Exception):
    """The model could not be written as ONNX; the message says why."""


@dataclass
class OnnxExport:
    """What :func:`save_onnx_model` wrote.

    Attributes:
        path: the file.
        opset: the ONNX opset of the default domain.
        dynamic_batch: whether the file takes any batch size; else only the example's.
        quantized: the layers stored as integer codes.
        containers: each of those layers' code type (``int2``, ``int4``, ``int8``, ``uint4``,
            ..., ``float16`` for a layer kept at 16 bits).
        left_in_float: layers stored as float weights, with why.
        weights: the graph value of each quantized weight -> its layer.
        activations: the layers whose input activation is quantized (with encodings).
    """

    path: Path
    opset: int
    dynamic_batch: bool = True
    quantized: list[str] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    activations: list[str] = field(default_factory=list)
    left_in_float: dict[str, str] = field(default_factory=dict)


def _export_graph(model: LoadedModel, example: tuple[torch.Tensor, ...]) -> tuple[Any, bool]:
    """The model (with its current weights) as an ONNX ``ModelProto``, and whether its batch
    dimension stays dynamic (as the model allows) or is fixed at the example's.

    A torch.export upload goes through torch's exporter as it is. A TorchScript upload goes
    through the TorchScript exporter; what that one refuses (``nn.MultiheadAttention``, for one)
    is translated to a torch.export program first and tried again, with a dynamic batch, else
    with the example's.
    """
    if model.format == "export":
        return _from_program(model.program, example, None), model.fixed_batch is None
    try:
        return _from_torchscript(model, example), model.fixed_batch is None
    except Exception as first:
        try:
            module = Positional(program_module(model, example))
        except ConversionRefused as exc:
            raise OnnxRefused(f"{_said(first)}; {exc}") from first
    shapes = batch_dynamic_shapes(example, model.fixed_batch is not None)
    if shapes is not None:
        try:
            return _from_program(module, example, shapes), True
        except Exception:  # a data-dependent view (MHA): fall back to the example's batch
            pass
    return _from_program(module, example, None), False


def input_names(count: int) -> list[str]:
    """The names ``model.onnx`` gives the model's positional inputs."""
    return [f"input_{i}" for i in range(count)]


def _said(exc: BaseException) -> str:
    return (
        f"torch's ONNX exporter could not write the model ({type(exc).__name__}: {str(exc)[:200]})"
    )


def _from_program(program: Any, example: tuple[torch.Tensor, ...], shapes: Any) -> Any:
    names = input_names(len(example))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, example, dynamo=True, input_names=names, dynamic_shapes=shapes, verbose=False
        )
    assert onnx_program is not None
    return onnx_program.model_proto


def _from_torchscript(model: LoadedModel, example: tuple[torch.Tensor, ...]) -> Any:
    import onnx

    names = input_names(len(example))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.module,
            example,
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to streams too
            dynamo=False,
            opset_version=_TORCHSCRIPT_OPSET,
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names} if model.fixed_batch is None else None,
        )
    return onnx.load_model_from_string(buf.getvalue())


def _raise_opset(proto: Any) -> tuple[Any, int]:
    """``proto`` at opset 25, or 21 where the converter cannot take it that far."""
    from onnx import version_converter

    for opset in (_OPSET, _OPSET_NO_INT2):
        try:
            return version_converter.convert_version(proto, opset), opset
        except Exception:
            continue
    raise OnnxRefused("the exported graph could not be raised to ONNX opset 21")


def _container(bits: int, signed: bool, opset: int) -> Any:
    """The numpy (``ml_dtypes``) type a layer's codes are stored in: ONNX's int2, int4 or int8
    (unsigned for asymmetric codes)."""
    import ml_dtypes

    width = 2 if bits <= 2 and opset >= _OPSET else 4 if bits <= 4 else 8
    types = {
        (2, True): ml_dtypes.int2,
        (2, False): ml_dtypes.uint2,
        (4, True): ml_dtypes.int4,
        (4, False): ml_dtypes.uint4,
        (8, True): np.int8,
        (8, False): np.uint8,
    }
    return types[width, signed]


@dataclass
class _Candidate:
    layer: QuantizedLayer
    weight: NDArray[np.float32]  # the dequantized weight, in the parameter's layout


def _candidates(
    layers: dict[str, QuantizedLayer], dtypes: dict[str, torch.dtype]
) -> dict[tuple[int, ...], list[_Candidate]]:
    """Layers by the shapes an initializer holding them may have (their own, or transposed),
    each weight as the model holds it: dequantized, then rounded to the parameter's dtype."""
    out: dict[tuple[int, ...], list[_Candidate]] = {}
    for name, layer in layers.items():
        w = layer.dequantized(dtypes.get(name, torch.float32)).float().numpy()
        out.setdefault(tuple(w.shape), []).append(_Candidate(layer, w))
        if w.ndim == 2 and w.shape[0] != w.shape[1]:
            out.setdefault(tuple(w.shape[::-1]), []).append(_Candidate(layer, w))
    return out


@dataclass(frozen=True)
class _Found:
    layer: QuantizedLayer
    flipped: bool  # the initializer holds the weight transposed
    factors: NDArray[np.float32] | None  # per output channel: a BatchNorm folded in


def _channel_factors(
    a: NDArray[np.float32], w: NDArray[np.float32], rtol: float
) -> NDArray[np.float32] | None:
    """``f`` with ``a == w * f`` per output channel (dim 0) to the initializer's rounding
    (``rtol``), or None: a weight into which the exporter folded a following BatchNorm."""
    rows_a, rows_w = a.reshape(a.shape[0], -1), w.reshape(w.shape[0], -1)
    norm = (rows_w * rows_w).sum(axis=1)
    f = np.where(norm > 0, (rows_a * rows_w).sum(axis=1) / np.where(norm > 0, norm, 1), 1.0)
    f = f.astype(np.float32)
    scale = float(np.abs(rows_a).max(initial=0.0))
    if np.allclose(rows_a, rows_w * f[:, None], rtol=rtol, atol=rtol * 0.1 * scale):
        return f
    return None


def _match(array: NDArray[Any], candidates: Sequence[_Candidate]) -> _Found | None:
    """The layer an initializer holds: as it is, transposed, or with a BatchNorm folded in."""
    # A folded weight is rounded once more in the initializer's dtype: allow two of its ulps.
    rtol = 1e-5 if array.dtype in (np.float32, np.float64) else 2.0**-7
    a = array.astype(np.float32)
    for c in candidates:
        if a.shape == c.weight.shape and np.array_equal(a, c.weight):
            return _Found(c.layer, False, None)
        if a.ndim == 2 and a.shape == c.weight.shape[::-1] and np.array_equal(a, c.weight.T):
            return _Found(c.layer, True, None)
    for c in candidates:
        if a.shape == c.weight.shape and not c.layer.transposed and a.ndim > 1:
            f = _channel_factors(a, c.weight, rtol)
            if f is not None:
                return _Found(c.layer, False, f)
    return None


def _layer_codes(layer: QuantizedLayer, flipped: bool) -> tuple[NDArray[Any], int]:
    """The codes in the initializer's layout, and the axis of the output channels."""
    codes = output_major(layer.codes, layer.transposed)
    axis = 1 if layer.transposed and codes.dim() >= 2 else 0
    if flipped:
        codes, axis = codes.t(), 1 - axis
    return codes.contiguous().numpy(), axis


def _dequantize_nodes(
    name: str, init: Any, found: _Found, opset: int
) -> tuple[list[Any], list[Any]] | str:
    """Nodes and initializers that compute initializer ``name`` from the layer's codes, or why
    they cannot."""
    from onnx import TensorProto, helper, numpy_helper

    layer = found.layer
    codes, axis = _layer_codes(layer, found.flipped)
    shape = codes.shape
    scales = layer.scales.float().numpy()
    zeros = None if layer.zeros is None else layer.zeros.numpy().reshape(scales.shape)
    if found.factors is not None:  # the folded BatchNorm's factor joins each channel's scale
        scales = scales * found.factors.reshape(-1, *([1] * (scales.ndim - 1)))
    attrs: dict[str, Any] = {"axis": axis}
    if scales.ndim == 2:  # per group of input columns: ONNX's blocked quantization
        if codes.ndim > 2 and axis != 0:
            return "group-wise scales of a transposed weight with more than two dimensions"
        codes = codes.reshape(codes.shape[0], -1) if axis == 0 else codes
        attrs = {"axis": 1 - axis, "block_size": codes.shape[1 - axis] // scales.shape[1]}
        if axis == 1:
            scales = scales.T
            zeros = None if zeros is None else zeros.T
    container = _container(layer.bits, zeros is None, opset)
    inits = [
        numpy_helper.from_array(codes.astype(container), f"{name}__codes"),
        numpy_helper.from_array(np.ascontiguousarray(scales), f"{name}__scale"),
    ]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros.astype(container), f"{name}__zero"))
    steps = [("DequantizeLinear", [i.name for i in inits], attrs)]
    if codes.shape != shape:  # group-wise codes of a convolution, dequantized as a matrix
        inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{name}__shape"))
        steps.append(("Reshape", [f"{name}__shape"], {}))
    if init.data_type != TensorProto.FLOAT:
        steps.append(("Cast", [], {"to": init.data_type}))
    nodes, value = [], ""
    for i, (op, extra, kw) in enumerate(steps):
        out = name if i == len(steps) - 1 else f"{name}__{op.lower()}"
        inputs = extra if not value else [value, *extra]
        nodes.append(helper.make_node(op, inputs, [out], name=f"{name}__{op.lower()}_op", **kw))
        value = out
    return nodes, inits


def _half_nodes(name: str, init: Any, layer: QuantizedLayer) -> tuple[list[Any], list[Any]] | str:
    """A layer kept at 16 bits: its 16-bit weight and a Cast, where the graph holds it wider."""
    from onnx import TensorProto, helper, numpy_helper

    if init.data_type != TensorProto.FLOAT:
        return "already stored in 16 bits"
    if layer.codes.dtype == torch.bfloat16:
        return "a bfloat16 weight in a float32 graph (kept in float32)"
    half = numpy_helper.from_array(layer.codes.numpy(), f"{name}__half")
    cast = helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT)
    return [cast], [half]


def _replace_weights(
    proto: Any, layers: dict[str, QuantizedLayer], dtypes: dict[str, torch.dtype], opset: int
) -> OnnxExport:
    """Swap every initializer holding a quantized layer for its codes; returns what was done
    (``path`` is filled in by the caller)."""
    from onnx import numpy_helper

    graph = proto.graph
    done = OnnxExport(Path(), opset)
    shapes = _candidates(layers, dtypes)
    kept, new_nodes, seen = [], [], set()
    for init in graph.initializer:
        found = _match(numpy_helper.to_array(init), shapes.get(tuple(init.dims), []))
        if found is None:
            kept.append(init)
            continue
        layer = found.layer
        if layer.bits == FLOAT_BITS:
            made = (
                _half_nodes(init.name, init, layer)
                if found.factors is None
                else "a 16-bit weight with a BatchNorm folded in (kept in float32)"
            )
        else:
            made = _dequantize_nodes(init.name, init, found, opset)
        if isinstance(made, str):
            kept.append(init)
            done.left_in_float[layer.name] = made
            continue
        nodes, inits = made
        new_nodes.extend(nodes)
        kept.extend(inits)
        seen.add(layer.name)
        done.weights[init.name] = layer.name
        done.containers[layer.name] = str(numpy_helper.to_array(inits[0]).dtype)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Initializer-fed nodes go first, so the graph stays topologically sorted.
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*new_nodes, *old])
    done.quantized = sorted(seen)
    for name in layers:
        if name not in seen and name not in done.left_in_float:
            done.left_in_float[name] = "the exporter stored no initializer equal to the weight"
    return done


def _save_proto(proto: Any, out: Any) -> None:
    import onnx

    onnx.save_model(proto, out)


def save_onnx_model(
    model: LoadedModel,
    layers: dict[str, QuantizedLayer],
    example: Sequence[torch.Tensor],
    path: str | Path,
    *,
    encodings: Mapping[str, ActEncoding] | None = None,
) -> OnnxExport:
    """Write ``model.onnx`` with the quantized layers as integer codes.

    Args:
        model: the job's model, holding the dequantized weights (the simulated quantized model).
        layers: the quantized layers.
        example: one batch of inputs to export with (the batch dimension stays dynamic where the
            model allows).
        path: the file, or a directory to write :data:`ONNX_NAME` into.
        encodings: the quantized layers' input activation encodings, as quantize/dequantize
            pairs in the graph (:mod:`mpq_core.onnx_activations`).

    Raises:
        OnnxRefused: torch's exporter or ONNX's checker refused the model (the message says
            why); nothing is written.
    """
    import onnx

    weights = sum(p.numel() * p.element_size() for p in model.named_weights().values())
    if weights > _PROTO_LIMIT:
        raise OnnxRefused(
            f"the model's weights take {weights / 1e9:.1f} GB, over ONNX's 2 GB limit for one "
            "file; weights in an external data file are not written yet"
        )
    inputs = tuple(t.detach().to("cpu") for t in example)
    try:
        proto, dynamic = _export_graph(model, inputs)
        proto, opset = _raise_opset(proto)
        dtypes = {name: p.dtype for name, p in model_parameters(model).items()}
        done = _replace_weights(proto, layers, dtypes, opset)
        done.dynamic_batch = dynamic
        if encodings:
            done.activations = add_activation_qdq(proto, done.weights, encodings)
        onnx.checker.check_model(proto)
    except OnnxRefused:
        raise
    except Exception as exc:
        raise OnnxRefused(_said(exc)) from exc
    done.path = file_target(path, ONNX_NAME)
    write_atomic(done.path, lambda out: _save_proto(proto, out))
    return done
