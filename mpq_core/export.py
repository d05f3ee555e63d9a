"""The artefacts of a job: the packed checkpoint and the dequantized drop-in model.

``model.mpq.safetensors`` (a plain safetensors file) holds

- per quantized layer ``i`` (its position in the ``layers`` metadata, also stored as ``"i"``):
  ``q:<i>``, the codes packed by :func:`mpq_core.packing.pack_codes` (``uint8``, one dimension),
  and ``s:<i>``, one ``float16`` scale per output channel;
- every other parameter of the model in ``float32`` under its own qualified name (biases, norms,
  weights left in float; a tied weight once);
- string metadata: ``format=mpq.packed``, ``schema_version=1``, ``layers`` (compact JSON
  ``{name: {"i": index, "bits": b, "shape": [...]}}``), ``crc32`` (hex CRC-32 of every tensor's
  name and bytes, in sorted name order) and, when given, ``mpq`` (the caller's JSON metadata).

Its size is the ``size`` budget's prediction (``sum (params*b + channels*16)/8 + 4*float
params``) plus the safetensors header and at most one byte of padding per layer.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from mpq_core.errors import ModelFormatError
from mpq_core.intake import LoadedModel
from mpq_core.packing import pack_codes, packed_nbytes, unpack_codes
from mpq_core.quantized import QuantizedLayer, apply_weights, model_parameters
from mpq_core.quantizer import MAX_BITS, MIN_BITS

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "SCHEMA_VERSION",
    "PackedCheckpoint",
    "load_packed_checkpoint",
    "restore_into",
    "save_packed_checkpoint",
    "save_quantized_model",
]

CHECKPOINT_NAME = "model.mpq.safetensors"
FORMAT = "mpq.packed"
SCHEMA_VERSION = 1
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


@dataclass
class PackedCheckpoint:
    """A loaded ``model.mpq.safetensors``.

    Attributes:
        layers: the quantized layers (codes unpacked to ``int8``, scales as float32).
        float_params: every other stored parameter, float32.
        metadata: the caller's metadata (the ``mpq`` entry), ``{}`` when none was saved.
    """

    layers: dict[str, QuantizedLayer]
    float_params: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


def _codes_key(i: int) -> str:
    return f"q:{i}"


def _scales_key(i: int) -> str:
    return f"s:{i}"


def _crc(tensors: dict[str, NDArray[Any]]) -> str:
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(tensors[key]).reshape(-1).view(np.uint8).data, crc)
    return f"{crc:08x}"


def _target(path: str | Path, default_name: str) -> Path:
    p = Path(path)
    return p / default_name if p.is_dir() else p


def _write_atomic(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so no half file is left."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the artefact from other services
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_packed_checkpoint(
    path: str | Path,
    model: LoadedModel,
    layers: dict[str, QuantizedLayer],
    *,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write the bit-packed checkpoint.

    Args:
        path: the file to write, or a directory to write ``model.mpq.safetensors`` into.
        model: the model; its parameters outside ``layers`` are stored as float32.
        layers: the quantized layers (from ``quantize_weights``).
        metadata: JSON-serialisable caller metadata, stored compactly under ``mpq``.

    Returns:
        The file's size in bytes.

    Raises:
        KeyError: a layer the model has no parameter for.
        ValueError: a layer whose codes or scales are malformed.
    """
    params = model_parameters(model)
    tensors: dict[str, NDArray[Any]] = {}
    table: dict[str, dict[str, Any]] = {}
    quantized_ptrs: set[tuple[int, tuple[int, ...]]] = set()
    for i, (name, layer) in enumerate(layers.items()):
        p = params.get(name)
        if p is None:
            raise KeyError(f"the model has no parameter named {name!r}")
        shape = layer.shape
        if tuple(p.shape) != shape or len(shape) == 0:
            raise ValueError(f"layer {name!r}: codes of shape {shape} do not fit the parameter")
        scales = layer.scales.detach().to("cpu", torch.float32).reshape(-1)
        if scales.numel() != shape[0]:
            raise ValueError(f"layer {name!r}: {scales.numel()} scales for {shape[0]} channels")
        half = scales.half()
        if not torch.equal(half.float(), scales):
            raise ValueError(f"layer {name!r}: scales are not fp16-representable")
        quantized_ptrs.add((p.data_ptr(), tuple(p.shape)))
        tensors[_codes_key(i)] = pack_codes(layer.codes.detach().cpu().numpy(), layer.bits)
        tensors[_scales_key(i)] = half.numpy()
        table[name] = {"i": i, "bits": int(layer.bits), "shape": list(shape)}
    for name, p in model.named_weights().items():
        if name in layers or (p.data_ptr(), tuple(p.shape)) in quantized_ptrs:
            continue
        if name in tensors:
            raise ValueError(f"parameter name {name!r} clashes with a packed tensor's key")
        tensors[name] = p.detach().to("cpu", torch.float32).contiguous().numpy()
    meta = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "layers": json.dumps(table, separators=(",", ":")),
        "crc32": _crc(tensors),
    }
    if metadata is not None:
        meta["mpq"] = json.dumps(metadata, separators=(",", ":"), sort_keys=True)
    data = st_save(tensors, metadata=meta)
    target = _target(path, CHECKPOINT_NAME)
    _write_atomic(target, lambda tmp: Path(tmp).write_bytes(data))
    return target.stat().st_size


def _corrupt(where: str, why: str) -> ModelFormatError:
    return ModelFormatError(
        f"{where} is not a valid mpq packed checkpoint: {why}", code="checkpoint_corrupt"
    )


def _read_metadata(data: bytes, where: str) -> dict[str, str]:
    if len(data) < 8:
        raise _corrupt(where, f"the file has only {len(data)} bytes (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_LIMIT or 8 + n > len(data):
        raise _corrupt(where, "the safetensors header is cut off or its length is invalid")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(where, f"the safetensors header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise _corrupt(where, "it has no safetensors metadata")
    return {str(k): str(v) for k, v in meta.items()}


def _layer_table(meta: dict[str, str], where: str) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    try:
        raw = json.loads(meta["layers"])
        table = {
            str(name): (int(e["i"]), int(e["bits"]), tuple(int(s) for s in e["shape"]))
            for name, e in raw.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(where, f"the 'layers' metadata is malformed ({exc!r})") from exc
    for name, (_, bits, shape) in table.items():
        if not MIN_BITS <= bits <= MAX_BITS or not shape or min(shape) < 0:
            raise _corrupt(where, f"layer {name!r} has bits={bits} shape={list(shape)}")
    return table


def load_packed_checkpoint(path: str | Path) -> PackedCheckpoint:
    """Read ``model.mpq.safetensors`` (a file, or a directory holding one).

    Raises:
        ModelFormatError: (code ``checkpoint_corrupt``) the file is missing, truncated, not a
            safetensors file, not an mpq checkpoint of a known schema version, inconsistent,
            or its data fails the CRC check.
    """
    target = _target(path, CHECKPOINT_NAME)
    where = f"{target.name!r}"
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise _corrupt(where, f"it cannot be read ({exc.strerror or exc})") from exc
    meta = _read_metadata(data, where)
    if meta.get("format") != FORMAT:
        raise _corrupt(where, f"its metadata format is {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise _corrupt(
            where,
            f"schema_version {meta.get('schema_version')!r} is not supported "
            f"(this mpq reads {SCHEMA_VERSION})",
        )
    table = _layer_table(meta, where)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise _corrupt(where, f"the tensor data is truncated or corrupt ({exc})") from exc
    if _crc(tensors) != meta.get("crc32"):
        raise _corrupt(where, "its tensor data does not match the stored CRC-32 (corrupted)")
    layers: dict[str, QuantizedLayer] = {}
    used: set[str] = set()
    for name, (i, bits, shape) in table.items():
        ck, sk = _codes_key(i), _scales_key(i)
        packed, scales = tensors.get(ck), tensors.get(sk)
        if packed is None or scales is None:
            raise _corrupt(where, f"the tensors of layer {name!r} ({ck}, {sk}) are missing")
        count = int(np.prod(shape))
        if packed.dtype != np.uint8 or packed.size != packed_nbytes(count, bits):
            raise _corrupt(where, f"layer {name!r}: packed codes have the wrong size or dtype")
        if scales.dtype != np.float16 or scales.shape != (shape[0],):
            raise _corrupt(where, f"layer {name!r}: scales have the wrong shape or dtype")
        try:
            codes = unpack_codes(packed, bits, count)
        except ValueError as exc:
            raise _corrupt(where, f"layer {name!r}: {exc}") from exc
        layers[name] = QuantizedLayer(
            name=name,
            bits=bits,
            codes=torch.from_numpy(codes.reshape(shape)),
            scales=torch.from_numpy(scales.astype(np.float32)),
        )
        used.update((ck, sk))
    float_params: dict[str, torch.Tensor] = {}
    for key, arr in tensors.items():
        if key in used:
            continue
        if arr.dtype != np.float32:
            raise _corrupt(where, f"tensor {key!r} is {arr.dtype}, expected float32")
        float_params[key] = torch.from_numpy(arr.copy())
    user: dict[str, Any] = {}
    if "mpq" in meta:
        try:
            user = json.loads(meta["mpq"])
        except json.JSONDecodeError as exc:
            raise _corrupt(where, "the 'mpq' metadata is not JSON") from exc
    return PackedCheckpoint(layers=layers, float_params=float_params, metadata=user)


def restore_into(model: LoadedModel, checkpoint: PackedCheckpoint) -> None:
    """Write the checkpoint's dequantized weights and float parameters into ``model``, in place.

    The result is bit-identical to ``apply_weights(model, quantize_weights(model, bits))`` on
    the model the checkpoint was saved from.

    Raises:
        ModelFormatError: (code ``checkpoint_mismatch``) the checkpoint names a parameter the
            model lacks, a shape differs, or a parameter of the model is not in the checkpoint.
    """

    def mismatch(why: str) -> ModelFormatError:
        return ModelFormatError(
            f"the packed checkpoint does not fit this model: {why}", code="checkpoint_mismatch"
        )

    params = model_parameters(model)
    values: dict[str, torch.Tensor] = {}
    for name, layer in checkpoint.layers.items():
        values[name] = layer.dequantized()
    for name, t in checkpoint.float_params.items():
        values[name] = t
    covered: set[tuple[int, tuple[int, ...]]] = set()
    for name, v in values.items():
        p = params.get(name)
        if p is None:
            raise mismatch(f"the model has no parameter {name!r}")
        if tuple(p.shape) != tuple(v.shape):
            raise mismatch(
                f"parameter {name!r} has shape {tuple(p.shape)}, the checkpoint {tuple(v.shape)}"
            )
        covered.add((p.data_ptr(), tuple(p.shape)))
    missing = [
        n for n, p in model.named_weights().items() if (p.data_ptr(), tuple(p.shape)) not in covered
    ]
    if missing:
        raise mismatch(f"no values for the parameters {missing[:5]}")
    with torch.no_grad():
        for name, v in values.items():
            params[name].copy_(v)


@contextmanager
def _applied(model: LoadedModel, layers: dict[str, QuantizedLayer]) -> Iterator[None]:
    """The model with the layers' dequantized weights, its float weights restored on exit."""
    params = model_parameters(model)
    saved = {name: params[name].detach().clone() for name in layers if name in params}
    try:
        apply_weights(model, layers)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def save_quantized_model(
    model: LoadedModel, layers: dict[str, QuantizedLayer], path: str | Path
) -> None:
    """Write the drop-in quantized model (``model.pt`` / ``model.pt2``): the model in its own
    format with the dequantized weights, loadable with stock ``torch.jit.load`` /
    ``torch.export.load``. The caller's model is left with its float weights.

    Args:
        path: the file to write, or a directory to write ``model`` + ``model.suffix`` into.
    """
    target = _target(path, "model" + model.suffix)
    with _applied(model, layers):
        _write_atomic(target, model.save)
