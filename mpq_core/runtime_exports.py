"""The quantized model in formats a runtime executes: ``model.compressed.pt2``
(:mod:`mpq_core.compressed_model`) and ``model.onnx`` (:mod:`mpq_core.onnx_export`), each
written, loaded back the way a user loads it and run on one batch against the simulated
quantized model, so the report says how close each one is.

A model that torch's exporters cannot record gets no such file; the report's ``exports`` entry
says why, and the job still succeeds (the drop-in ``model.pt`` / ``model.pt2`` and the packed
checkpoint are always written).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpq_core.actquant import ActEncoding, ActivationQuantizer
from mpq_core.compressed_model import COMPRESSED_NAME, CompressionRefused, save_compressed_model
from mpq_core.intake import LoadedModel
from mpq_core.onnx_export import ONNX_NAME, OnnxRefused, save_onnx_model
from mpq_core.quantized_weights import QuantizedLayer

__all__ = ["ONNX_SESSION_CONFIG", "onnx_session", "write_runtime_exports"]

#: onnxruntime's session setting that computes the int4 matmuls it fuses in float32. Its
#: default (accuracy level 4) quantizes their activations to int8 on the fly: faster, and about
#: 1% off the simulated model on the zoo's transformers.
ONNX_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def _outputs(out: Any) -> list[np.ndarray]:
    """Every tensor of a model's output, in the order exporters flatten it."""
    from torch.utils._pytree import tree_leaves

    return [t.detach().float().numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _max_difference(got: Sequence[Any], want: Sequence[np.ndarray]) -> float:
    """The largest absolute difference over every output; inf where the outputs differ in
    number or shape."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g, dtype=np.float64)
        if g.shape != w.shape:
            return float("inf")
        worst = max(worst, float(np.abs(g - w).max(initial=0.0)))
    return worst


def _check_compressed(
    path: Path, example: Sequence[torch.Tensor], want: Sequence[np.ndarray]
) -> float:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(path)).module()
        return _max_difference(_outputs(module(*example)), want)


def onnx_session(path: str | Path, config: Mapping[str, str] = ONNX_SESSION_CONFIG) -> Any:
    """An onnxruntime CPU session of ``path`` with ``config`` (mpq's float32-compute setting
    by default), as the job checks ``model.onnx``.

    Raises:
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_onnx(path: Path, example: Sequence[torch.Tensor], want: Sequence[np.ndarray]) -> Any:
    """How far onnxruntime's output is from ``want``; None where onnxruntime is not installed,
    or what it said where it cannot run the model (its CPU kernels lack some 16-bit types)."""
    try:
        session = onnx_session(path)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), example, strict=True)}
        return _max_difference(session.run(None, feeds), want)
    except ImportError:
        return None
    except Exception as exc:  # onnxruntime's own errors carry no common base class
        return f"onnxruntime's CPU provider could not run it: {str(exc)[:200]}"


def write_runtime_exports(
    model: LoadedModel,
    layers: dict[str, QuantizedLayer],
    example: Sequence[torch.Tensor],
    out: Path,
    encodings: Mapping[str, ActEncoding] | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the compressed program and the ONNX model into ``out``.

    Args:
        model: the job's model, holding the dequantized weights.
        layers: the quantized layers.
        example: one batch of inputs (CPU) to record the programs with and check them on.
        encodings: with activation quantization, the layers' input encodings: ``model.onnx``
            quantizes those activations too (the compressed program does not: it holds the
            weights only).

    Returns:
        The files written by name, and the report's ``exports`` entry: per file, whether it was
        written, why not, or its largest absolute difference from the simulated model on
        ``example`` (ONNX: also its opset and the layers left in float).
    """
    inputs = [t.detach().to("cpu") for t in example]
    with torch.no_grad():
        want = _outputs(model(*inputs))
        want_onnx = want
        if encodings:  # the ONNX model quantizes activations as the simulated model does
            with ActivationQuantizer(model.named_weights(), dict(encodings)):
                want_onnx = _outputs(model(*inputs))
    files: dict[str, Path] = {}
    report: dict[str, Any] = {}
    try:
        path = save_compressed_model(model, layers, inputs, out / COMPRESSED_NAME)
        files[COMPRESSED_NAME] = path
        report[COMPRESSED_NAME] = {
            "written": True,
            "max_abs_difference": _check_compressed(path, inputs, want),
        }
    except CompressionRefused as exc:
        report[COMPRESSED_NAME] = {"written": False, "reason": str(exc)}
    try:
        done = save_onnx_model(model, layers, inputs, out / ONNX_NAME, encodings=encodings)
        files[ONNX_NAME] = done.path
        report[ONNX_NAME] = {
            "written": True,
            "opset": done.opset,
            "batch": "dynamic" if done.dynamic_batch else len(inputs[0]),
            "quantized_layers": len(done.quantized),
            "left_in_float": done.left_in_float,
            "quantized_activations": len(done.activations),
            "max_abs_difference": _check_onnx(done.path, inputs, want_onnx),  # or why not
            "session_config": ONNX_SESSION_CONFIG,
        }
    except OnnxRefused as exc:
        report[ONNX_NAME] = {"written": False, "reason": str(exc)}
    return files, report
