"""The packed checkpoint ``model.mpq.safetensors``: bit-packed integer codes, scales and float
parameters, loaded back bit-exactly (the drop-in model is :mod:`mpq_core.dropin_model`).

``model.mpq.safetensors`` (a plain safetensors file, schema version 2) holds exactly three
tensors, each one-dimensional:

- ``q`` (``uint8``): every quantized layer's codes packed by :func:`mpq_core.packing.pack_codes`,
  concatenated in table order; each layer starts at a byte boundary and takes
  ``ceil(params*bits/8)`` bytes (a layer kept at 16 bits: its float16 or bfloat16 values,
  little-endian, ``2*params`` bytes; asymmetric codes are unsigned, ``signed=False``, and
  followed by the layer's zero points, one byte each);
- ``s`` (``float16``): every quantized layer's per-output-channel scales, concatenated
  (``shape[0]`` each, ``shape[0] * groups`` with group-wise scales, channel-major; none for a
  layer at 16 bits);
- ``f`` (``float32``; ``float16``, or ``bfloat16`` as its raw bits in ``uint16``, when every such
  parameter has that dtype, named by the metadata key ``f_dtype``): every other parameter of the
  model (biases, norms, weights left in float;
  a tied weight once), flattened in C order and concatenated;

and string metadata:

- ``format=mpq.packed``, ``schema_version=2``;
- ``table``: ``base85(zlib(json))`` (:func:`base64.b85encode`) of the compact JSON
  ``{"layers": [[name, bits, shape], ...], "floats": [[name, shape], ...]}`` in storage order
  (a layer at 16 bits or of another scheme than per-channel symmetric carries a fourth entry,
  ``{"dtype": "float16" | "bfloat16"}`` or ``{"groups": G, "zero": true}``);
  each entry's offset into ``q`` / ``s`` / ``f`` is the sum of the sizes of the entries before it,
  and the sizes must add up to the tensors' lengths exactly;
- ``crc32``: hex CRC-32 of every tensor's name and bytes, in sorted name order (the table is
  guarded by zlib's own checksum);
- ``mpq``, when given: the caller's JSON metadata.

So the names, bits and shapes are readable from the file alone, and the header stays small
(560 bytes for the 38-parameter benchmark LM, under 1,000 bytes for ~50 parameters; the table's
qualified names compress well). The file's size is the ``size`` budget's prediction
(``sum (params*b + channels*16)/8 + 4*float params``) plus the safetensors header and under one
byte of padding per layer.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from mpq_core.atomic_write import file_target, write_atomic
from mpq_core.errors import ModelFormatError
from mpq_core.intake import LoadedModel
from mpq_core.packing import pack_codes, packed_nbytes, unpack_codes
from mpq_core.quant_primitives import FLOAT_BITS, MAX_BITS, MIN_BITS, float16_dtype
from mpq_core.quantized_weights import QuantizedLayer, model_parameters
from mpq_core.scheme import QuantScheme

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "SCHEMA_VERSION",
    "PackedCheckpoint",
    "file_bytes_of",
    "float_storage_dtype",
    "job_metadata",
    "load_packed_checkpoint",
    "packed_file_bytes",
    "restore_into",
    "save_packed_checkpoint",
]

CHECKPOINT_NAME = "model.mpq.safetensors"
FORMAT = "mpq.packed"
SCHEMA_VERSION = 2
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header
_CODES, _SCALES, _FLOATS = "q", "s", "f"
_TABLE = "table"
_FLOAT_DTYPE = "f_dtype"
# How ``f`` holds each storage dtype in numpy (which has no bfloat16: its raw 16 bits).
_NUMPY_OF = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def float_storage_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype the checkpoint stores the float parameters in: theirs when they all share a
    16-bit one (a bfloat16 or float16 model keeps 2 bytes a parameter), else float32, which
    holds every float16 and bfloat16 value exactly."""
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
        return next(iter(dtypes))
    return torch.float32


def _to_numpy(t: torch.Tensor, dtype: torch.dtype) -> NDArray[Any]:
    t = t.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_numpy(a: NDArray[Any], dtype_name: str) -> torch.Tensor:
    if dtype_name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


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


@dataclass(frozen=True)
class _Table:
    """The decoded ``table`` metadata: storage order, offsets derived from the sizes."""

    layers: list[tuple[str, int, tuple[int, ...]]]
    floats: list[tuple[str, tuple[int, ...]]]
    # A layer's scheme when not per-channel symmetric: {"dtype": ...} at 16 bits, else
    # {"groups": G} (scales per channel), {"zero": True} (asymmetric codes) and
    # {"transposed": True} (a weight stored (in, out, ...): its codes are stored transposed,
    # output channels first, as the scales follow them).
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


def _layer_entry(table: _Table, name: str, bits: int, shape: tuple[int, ...]) -> list[Any]:
    entry: list[Any] = [name, bits, list(shape)]
    return [*entry, table.extra[name]] if name in table.extra else entry


def _code_shape(shape: tuple[int, ...], extra: dict[str, Any]) -> tuple[int, ...]:
    """The shape of a layer's codes: the parameter's, output channels first."""
    if extra.get("transposed") and len(shape) >= 2:
        return (shape[1], shape[0], *shape[2:])
    return shape


def _scale_count(bits: int, shape: tuple[int, ...], extra: dict[str, Any]) -> int:
    return 0 if bits == FLOAT_BITS else _code_shape(shape, extra)[0] * int(extra.get("groups", 1))


def _code_bytes(bits: int, shape: tuple[int, ...], extra: dict[str, Any]) -> int:
    """Bytes a layer takes in ``q``: packed codes (and zero points, one byte each), or two a
    value at 16 bits."""
    count = math.prod(shape)
    if bits == FLOAT_BITS:
        return 2 * count
    zeros = _scale_count(bits, shape, extra) if extra.get("zero") else 0
    return packed_nbytes(count, bits) + zeros


def _check_extra(bits: int, shape: tuple[int, ...], extra: dict[str, Any]) -> bool:
    """Whether a table entry's scheme is one this reader knows and fits the layer."""
    if bits == FLOAT_BITS:
        return set(extra) == {"dtype"} and extra["dtype"] in ("float16", "bfloat16")
    groups = extra.get("groups", 1)
    cols = math.prod(_code_shape(shape, extra)[1:])
    return (
        set(extra) <= {"groups", "zero", "transposed"}
        and extra.get("zero", True) is True
        and extra.get("transposed", True) is True
        and len(shape) >= (2 if "transposed" in extra else 1)
        and isinstance(groups, int)
        and groups >= 1
        and cols % groups == 0
    )


def _encode_table(table: _Table) -> str:
    raw = {
        "layers": [_layer_entry(table, n, b, s) for n, b, s in table.layers],
        "floats": [[name, list(shape)] for name, shape in table.floats],
    }
    text = json.dumps(raw, separators=(",", ":")).encode()
    return base64.b85encode(zlib.compress(text, 9)).decode("ascii")


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    ):
        raise ValueError(f"bad shape {value!r}")
    return tuple(value)


def _decode_table(meta: dict[str, str], where: str) -> _Table:
    try:
        raw = json.loads(zlib.decompress(base64.b85decode(meta[_TABLE])))
        layers = [(str(e[0]), int(e[1]), _shape(e[2])) for e in raw["layers"]]
        extra = {str(e[0]): dict(e[3]) for e in raw["layers"] if len(e) == 4}
        floats = [(str(n), _shape(s)) for n, s in raw["floats"]]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, zlib.error) as exc:
        raise _corrupt(where, f"the 'table' metadata is malformed ({exc!r})") from exc
    for name, bits, shape in layers:
        if not (MIN_BITS <= bits <= MAX_BITS or bits == FLOAT_BITS) or not shape:
            raise _corrupt(where, f"layer {name!r} has bits={bits} shape={list(shape)}")
        if (bits == FLOAT_BITS and name not in extra) or not _check_extra(
            bits, shape, extra.get(name, {})
        ):
            raise _corrupt(where, f"layer {name!r} at {bits} bits has a bad scheme entry")
    names = [n for n, _, _ in layers] + [n for n, _ in floats]
    if len(set(names)) != len(names):
        raise _corrupt(where, "the 'table' metadata names a parameter twice")
    return _Table(layers=layers, floats=floats, extra=extra)


def _crc(tensors: dict[str, NDArray[Any]]) -> str:
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(tensors[key]).reshape(-1).view(np.uint8).data, crc)
    return f"{crc:08x}"


def _concat(parts: list[NDArray[Any]], dtype: Any) -> NDArray[Any]:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.ascontiguousarray(np.concatenate([p.reshape(-1) for p in parts]), dtype=dtype)


def _metadata(
    table: _Table, crc: str, storage_name: str, metadata: dict[str, Any] | None
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        _TABLE: _encode_table(table),
        "crc32": crc,
    }
    if storage_name != "float32":
        meta[_FLOAT_DTYPE] = storage_name
    if metadata is not None:
        meta["mpq"] = json.dumps(metadata, separators=(",", ":"), sort_keys=True)
    return meta


def _kept_floats(
    model: LoadedModel, quantized: list[str]
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The parameters stored in ``f`` (a weight tied to a quantized one is not), and their
    storage dtype."""
    params = model_parameters(model)
    ptrs = {(params[n].data_ptr(), tuple(params[n].shape)) for n in quantized}
    kept = {
        name: p
        for name, p in model.named_weights().items()
        if name not in quantized and (p.data_ptr(), tuple(p.shape)) not in ptrs
    }
    return kept, float_storage_dtype({p.dtype for p in kept.values()})


def _file_bytes(lengths: dict[str, int], dtypes: dict[str, Any], meta: dict[str, str]) -> int:
    """The size of a safetensors file holding 1-D tensors of these lengths and dtypes, from
    its header alone (safetensors orders tensors by dtype then name, as a tiny file shows)."""
    tiny = st_save({k: np.zeros(1, dtype=dt) for k, dt in dtypes.items()}, metadata=meta)
    header = json.loads(tiny[8 : 8 + struct.unpack("<Q", tiny[:8])[0]])
    start = 0
    for key in sorted(lengths, key=lambda k: header[k]["data_offsets"][0]):
        size = lengths[key] * np.dtype(dtypes[key]).itemsize
        header[key]["shape"] = [lengths[key]]
        header[key]["data_offsets"] = [start, start + size]
        start += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text) % 8) + start


def packed_file_bytes(
    model: LoadedModel,
    bits_by_layer: dict[str, int],
    *,
    scheme: QuantScheme | None = None,
    transposed: Collection[str] = (),
    metadata: dict[str, Any] | None = None,
) -> int:
    """The exact size of the packed checkpoint :func:`save_packed_checkpoint` would write for
    this allocation, header included, without quantizing anything.

    Args:
        model: the model (its parameters' shapes and dtypes).
        bits_by_layer: parameter name -> bits (2..8, or 16).
        scheme: the weights' scheme (per-channel symmetric when None).
        transposed: layers stored ``(in, out, ...)``.
        metadata: the caller metadata the checkpoint will carry.
    """
    scheme = scheme or QuantScheme()
    params = model_parameters(model)
    table = _Table(layers=[], floats=[])
    codes = scales = 0
    for name, bits in bits_by_layer.items():
        p = params[name]
        shape = tuple(int(d) for d in p.shape)
        table.layers.append((name, int(bits), shape))
        if bits == FLOAT_BITS:
            table.extra[name] = {"dtype": str(float16_dtype(p.dtype)).removeprefix("torch.")}
            codes += 2 * p.numel()
            continue
        flip = name in transposed and len(shape) >= 2
        major = (shape[1], shape[0], *shape[2:]) if flip else shape
        groups = scheme.groups(major)
        extra: dict[str, Any] = {"groups": groups} if groups > 1 else {}
        if flip:
            extra["transposed"] = True
        codes += packed_nbytes(p.numel(), int(bits))
        if not scheme.symmetric:
            codes += major[0] * groups
            extra["zero"] = True
        scales += major[0] * groups
        if extra:
            table.extra[name] = extra
    kept, storage = _kept_floats(model, list(bits_by_layer))
    storage_name = str(storage).removeprefix("torch.")
    table.floats.extend((n, tuple(int(d) for d in p.shape)) for n, p in kept.items())
    lengths = {_CODES: codes, _SCALES: scales, _FLOATS: sum(p.numel() for p in kept.values())}
    dtypes = {_CODES: np.uint8, _SCALES: np.float16, _FLOATS: _NUMPY_OF[storage_name]}
    meta = _metadata(table, "0" * 8, storage_name, metadata)
    return _file_bytes(lengths, dtypes, meta)


def job_metadata(model: LoadedModel) -> dict[str, Any]:
    """The caller metadata a job's checkpoint carries: which model it belongs to."""
    return {"model_sha256": model.sha256, "format": model.format}


def file_bytes_of(
    model: LoadedModel, scheme: QuantScheme, transposed: Collection[str]
) -> Callable[[dict[str, int]], int]:
    """``bits_by_layer -> bytes`` of the job's packed checkpoint (:func:`packed_file_bytes`
    with :func:`job_metadata`): what a ``size`` budget is held to."""
    meta = job_metadata(model)

    def size(bits_by_layer: dict[str, int]) -> int:
        return packed_file_bytes(
            model, bits_by_layer, scheme=scheme, transposed=transposed, metadata=meta
        )

    return size


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
        model: the model; its parameters outside ``layers`` are stored in their own dtype when
            they share a 16-bit one, else as float32 (:func:`float_storage_dtype`).
        layers: the quantized layers (from ``quantize_weights``).
        metadata: JSON-serialisable caller metadata, stored compactly under ``mpq``.

    Returns:
        The file's size in bytes.

    Raises:
        KeyError: a layer the model has no parameter for.
        ValueError: a layer whose codes or scales are malformed.
    """
    params = model_parameters(model)
    codes: list[NDArray[Any]] = []
    scales: list[NDArray[Any]] = []
    floats: list[NDArray[Any]] = []
    table = _Table(layers=[], floats=[])
    for name, layer in layers.items():
        p = params.get(name)
        if p is None:
            raise KeyError(f"the model has no parameter named {name!r}")
        shape = layer.shape
        if tuple(p.shape) != shape or len(shape) == 0:
            raise ValueError(f"layer {name!r}: codes of shape {shape} do not fit the parameter")
        layer_codes, layer_scales, extra = _layer_arrays(layer)
        codes.append(layer_codes)
        scales.append(layer_scales)
        table.layers.append((name, int(layer.bits), tuple(int(d) for d in shape)))
        if extra:
            table.extra[name] = extra
    kept, storage = _kept_floats(model, list(layers))
    storage_name = str(storage).removeprefix("torch.")
    for name, p in kept.items():
        floats.append(_to_numpy(p, storage))
        table.floats.append((name, tuple(int(d) for d in p.shape)))
    tensors = {
        _CODES: _concat(codes, np.uint8),
        _SCALES: _concat(scales, np.float16),
        _FLOATS: _concat(floats, _NUMPY_OF[storage_name]),
    }
    meta = _metadata(table, _crc(tensors), storage_name, metadata)
    data = st_save(tensors, metadata=meta)
    target = file_target(path, CHECKPOINT_NAME)
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(data))
    return target.stat().st_size


def _layer_arrays(
    layer: QuantizedLayer,
) -> tuple[NDArray[np.uint8], NDArray[np.float16], dict[str, Any]]:
    """A layer's bytes in ``q``, its scales in ``s`` and its table entry's scheme."""
    name, shape = layer.name, tuple(layer.codes.shape)  # output channels first
    if layer.bits == FLOAT_BITS:
        if layer.codes.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"layer {name!r} at 16 bits holds {layer.codes.dtype}, not 16-bit")
        raw = _to_numpy(layer.codes, layer.codes.dtype).reshape(-1)
        little = raw.astype(raw.dtype.newbyteorder("<"), copy=False)
        dtype = str(layer.codes.dtype).removeprefix("torch.")
        return little.view(np.uint8), np.zeros(0, np.float16), {"dtype": dtype}
    groups = 1 if layer.scales.dim() <= 1 else layer.scales.shape[-1]
    s = layer.scales.detach().to("cpu", torch.float32).reshape(-1)
    if s.numel() != shape[0] * groups or math.prod(shape[1:]) % groups:
        raise ValueError(f"layer {name!r}: {s.numel()} scales for {shape[0]} channels")
    half = s.half()
    if not torch.equal(half.float(), s):
        raise ValueError(f"layer {name!r}: scales are not fp16-representable")
    extra: dict[str, Any] = {"groups": groups} if groups > 1 else {}
    if layer.transposed:
        extra["transposed"] = True
    codes = layer.codes.detach().cpu().numpy()
    if layer.zeros is None:
        return pack_codes(codes, layer.bits), half.numpy(), extra
    zeros = layer.zeros.detach().to("cpu", torch.uint8).reshape(-1).numpy()
    if zeros.size != s.numel():
        raise ValueError(f"layer {name!r}: {zeros.size} zero points for {s.numel()} scales")
    packed = pack_codes(codes, layer.bits, signed=False)
    return np.concatenate([packed, zeros]), half.numpy(), {**extra, "zero": True}


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


def _tensor(tensors: dict[str, NDArray[Any]], key: str, dtype: Any, where: str) -> NDArray[Any]:
    arr = tensors.get(key)
    if arr is None or arr.dtype != dtype or arr.ndim != 1:
        got = "missing" if arr is None else f"{arr.dtype} of shape {list(arr.shape)}"
        raise _corrupt(where, f"tensor {key!r} should be one-dimensional {np.dtype(dtype)}: {got}")
    return arr


def load_packed_checkpoint(path: str | Path) -> PackedCheckpoint:
    """Read ``model.mpq.safetensors`` (a file, or a directory holding one).

    Raises:
        ModelFormatError: (code ``checkpoint_corrupt``) the file is missing, truncated, not a
            safetensors file, not an mpq checkpoint of a known schema version, inconsistent,
            or its data fails the CRC check.
    """
    target = file_target(path, CHECKPOINT_NAME)
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
            f"(this mpq reads only version {SCHEMA_VERSION}; re-run the job to rewrite it)",
        )
    table = _decode_table(meta, where)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise _corrupt(where, f"the tensor data is truncated or corrupt ({exc})") from exc
    if set(tensors) != {_CODES, _SCALES, _FLOATS}:
        raise _corrupt(where, f"it holds the tensors {sorted(tensors)}, not ['f', 'q', 's']")
    if _crc(tensors) != meta.get("crc32"):
        raise _corrupt(where, "its tensor data does not match the stored CRC-32 (corrupted)")
    q = _tensor(tensors, _CODES, np.uint8, where)
    s = _tensor(tensors, _SCALES, np.float16, where)
    float_dtype = meta.get(_FLOAT_DTYPE, "float32")
    if float_dtype not in _NUMPY_OF:
        raise _corrupt(where, f"its float parameters are stored as {float_dtype!r}")
    f = _tensor(tensors, _FLOATS, _NUMPY_OF[float_dtype], where)
    ex = table.extra
    sizes = (
        sum(_code_bytes(b, shape, ex.get(n, {})) for n, b, shape in table.layers),
        sum(_scale_count(b, shape, ex.get(n, {})) for n, b, shape in table.layers),
        sum(math.prod(shape) for _, shape in table.floats),
    )
    if sizes != (q.size, s.size, f.size):
        raise _corrupt(
            where,
            f"the table calls for {sizes[0]} code bytes, {sizes[1]} scales and {sizes[2]} "
            f"floats; the file holds {q.size}, {s.size} and {f.size}",
        )
    layers: dict[str, QuantizedLayer] = {}
    qo = so = 0
    for name, bits, shape in table.layers:
        extra = table.extra.get(name, {})
        nbytes, nscales = _code_bytes(bits, shape, extra), _scale_count(bits, shape, extra)
        layers[name] = _read_layer(
            name, bits, shape, q[qo : qo + nbytes], s[so : so + nscales], extra, where
        )
        qo, so = qo + nbytes, so + nscales
    float_params: dict[str, torch.Tensor] = {}
    fo = 0
    for name, shape in table.floats:
        count = math.prod(shape)
        float_params[name] = _from_numpy(f[fo : fo + count].reshape(shape), float_dtype)
        fo += count
    user: dict[str, Any] = {}
    if "mpq" in meta:
        try:
            user = json.loads(meta["mpq"])
        except json.JSONDecodeError as exc:
            raise _corrupt(where, "the 'mpq' metadata is not JSON") from exc
    return PackedCheckpoint(layers=layers, float_params=float_params, metadata=user)


def _read_layer(
    name: str,
    bits: int,
    shape: tuple[int, ...],
    q: NDArray[np.uint8],
    s: NDArray[np.float16],
    extra: dict[str, Any],
    where: str,
) -> QuantizedLayer:
    """One layer from its bytes in ``q`` and its scales in ``s``."""
    if bits == FLOAT_BITS:
        half = extra["dtype"]
        little = q.view(np.dtype("<f2" if half == "float16" else "<u2"))
        native = little.astype(_NUMPY_OF[half]).reshape(shape)
        return QuantizedLayer(name, bits, _from_numpy(native, half), torch.zeros(0))
    signed = not extra.get("zero")
    shape = _code_shape(shape, extra)
    count = math.prod(shape)
    try:
        unpacked = unpack_codes(q[: packed_nbytes(count, bits)], bits, count, signed=signed)
    except ValueError as exc:
        raise _corrupt(where, f"layer {name!r}: {exc}") from exc
    groups = int(extra.get("groups", 1))
    scale_shape = (shape[0],) if groups == 1 else (shape[0], groups)
    zeros = None
    if not signed:
        zeros = torch.from_numpy(q[packed_nbytes(count, bits) :].copy()).reshape(scale_shape)
    return QuantizedLayer(
        name=name,
        bits=bits,
        codes=torch.from_numpy(unpacked.reshape(shape)),
        scales=torch.from_numpy(s.astype(np.float32)).reshape(scale_shape),
        zeros=zeros,
        transposed=bool(extra.get("transposed")),
    )


def _as_loaded(model: LoadedModel | torch.nn.Module | torch.export.ExportedProgram) -> LoadedModel:
    """``model`` as a ``LoadedModel`` whose parameters are the model's own tensors."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.export.ExportedProgram):
        # The program's module shares the program's parameter tensors: writing them in place
        # restores the program itself, and every later ``.module()`` of it.
        return LoadedModel(
            format="export", module=model.module(), sha256="", num_inputs=0, program=model
        )
    if isinstance(model, torch.nn.Module):  # a ScriptModule is one too
        return LoadedModel(format="torchscript", module=model, sha256="", num_inputs=0)
    raise TypeError(
        "restore_into takes a torch.jit.load / torch.export.load result, a torch.nn.Module or "
        f"mpq's LoadedModel, not {type(model).__name__}"
    )


def restore_into(
    model: LoadedModel | torch.nn.Module | torch.export.ExportedProgram,
    checkpoint: PackedCheckpoint,
) -> None:
    """Write the checkpoint's dequantized weights and float parameters into ``model``, in place.

    ``model`` is what a user has at hand: ``torch.jit.load(...)``, ``torch.export.load(...)``
    (its ``.module()`` then runs the restored weights), an eager module, or mpq's own
    ``LoadedModel``. The result is bit-identical to
    ``apply_weights(model, quantize_weights(model, bits))`` on the model the checkpoint was
    saved from.

    Example:
        >>> program = torch.export.load("model.pt2")  # doctest: +SKIP
        >>> restore_into(program, load_packed_checkpoint("model.mpq.safetensors"))  # doctest: +SKIP
        >>> program.module()(x)  # doctest: +SKIP

    Raises:
        ModelFormatError: (code ``checkpoint_mismatch``) the checkpoint names a parameter the
            model lacks, a shape differs, or a parameter of the model is not in the checkpoint.
        TypeError: ``model`` is none of the above.
    """
    model = _as_loaded(model)

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
