"""Activation ``QuantizeLinear``/``DequantizeLinear`` pairs in ``model.onnx``: the input of each
quantized layer quantized as the job's activation encodings say (``--quantize-activations``),
so the ONNX model computes what the simulated model does, and a runtime can pick integer kernels.

An encoding is per tensor: ``bits``, ``scale``, signed codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``
(zero point 0) or unsigned in ``[0, 2^b-1]``. A ``Clip`` to the encoding's range goes first
(ONNX's containers reach further: ``int4`` to -8). Codes of 5 to 8 bits are stored in
``uint8`` (signed ones with zero point 128), of 3 and 4 bits in ``int4``/``uint4``, of 2 in
``int2``/``uint2``.

Only float32 activations get pairs: ``QuantizeLinear`` takes its scale in the input's type, and
a 16-bit scale would round the encoding's. A layer whose weight feeds no convolution or matrix
product (an embedding's ``Gather``) has no input activation to quantize.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mpq_core.actquant import ActEncoding

__all__ = ["add_activation_qdq"]

# Ops with a weight and one activation input; the activation is the other non-constant input.
_PRODUCTS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _container(enc: ActEncoding) -> tuple[Any, int]:
    """The codes' ONNX type and zero point. Signed codes of 5 to 8 bits go into ``uint8`` with
    zero point 128 (the same values): onnxruntime's integer kernels take uint8 activations, and
    its QDQ rewrites of a Gemm's input fail on int8 ones."""
    import ml_dtypes

    width = 2 if enc.bits <= 2 else 4 if enc.bits <= 4 else 8
    if width == 8:
        return np.uint8, enc.zero_point + (128 if enc.signed else 0)
    signed = {2: ml_dtypes.int2, 4: ml_dtypes.int4}
    unsigned = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4}
    return (signed if enc.signed else unsigned)[width], enc.zero_point


def _activation_input(node: Any, weight: str, constants: set[str]) -> int | None:
    """Which input of ``node`` is the activation beside ``weight``."""
    for i, name in enumerate(node.input[:2]):
        if name and name != weight and name not in constants:
            return i
    return None


def _pair(tag: str, source: str, enc: ActEncoding) -> tuple[list[Any], list[Any], str]:
    """Clip, QuantizeLinear and DequantizeLinear of ``source``: nodes, initializers, output."""
    from onnx import helper, numpy_helper

    container, zero = _container(enc)
    inits = [
        numpy_helper.from_array(np.array(enc.qmin * enc.scale, np.float32), f"{tag}__lo"),
        numpy_helper.from_array(np.array(enc.qmax * enc.scale, np.float32), f"{tag}__hi"),
        numpy_helper.from_array(np.array(enc.scale, np.float32), f"{tag}__scale"),
        numpy_helper.from_array(np.array(zero).astype(container), f"{tag}__zero"),
    ]
    qdq = [f"{tag}__scale", f"{tag}__zero"]
    nodes = [
        helper.make_node("Clip", [source, f"{tag}__lo", f"{tag}__hi"], [f"{tag}__clip"]),
        helper.make_node("QuantizeLinear", [f"{tag}__clip", *qdq], [f"{tag}__q"]),
        helper.make_node("DequantizeLinear", [f"{tag}__q", *qdq], [f"{tag}__dq"]),
    ]
    return nodes, inits, f"{tag}__dq"


def _float_values(graph: Any) -> set[str]:
    """Names of the graph's float32 values (inputs, outputs and inferred intermediates)."""
    from onnx import TensorProto

    infos = [*graph.input, *graph.output, *graph.value_info]
    return {v.name for v in infos if v.type.tensor_type.elem_type == TensorProto.FLOAT}


def add_activation_qdq(
    proto: Any, weights: Mapping[str, str], encodings: Mapping[str, ActEncoding]
) -> list[str]:
    """Put a quantize/dequantize pair on the activation input of every node that multiplies by
    a quantized weight with an encoding.

    Args:
        proto: the ONNX model, its weights already replaced.
        weights: value name of each quantized weight in the graph -> its layer's name.
        encodings: layer name -> the encoding of its input activation.

    Returns:
        The layers whose inputs got a pair.
    """
    from onnx import shape_inference

    graph = proto.graph
    typed = _float_values(shape_inference.infer_shapes(proto).graph)
    constants = {i.name for i in graph.initializer}
    nodes, inits, done = [], [], set()
    for n, node in enumerate(graph.node):
        weight = next((v for v in node.input if v in weights), None)
        enc = None if weight is None else encodings.get(weights[weight])
        at = None if enc is None else _activation_input(node, weight or "", constants)
        if node.op_type in _PRODUCTS and enc is not None and at is not None:
            source = node.input[at]
            if source in typed:
                made, new_inits, out = _pair(f"act{n}", source, enc)
                nodes.extend(made)
                inits.extend(new_inits)
                node.input[at] = out
                done.add(weights[weight or ""])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    return sorted(done)
