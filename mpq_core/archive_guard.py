"""Refuse hostile model and data files at intake, before anything is deserialised.

Every upload is hostile until proven otherwise (DESIGN.md, "Trust boundary"). This module reads
only zip central directories, small JSON configs, ``.npy`` headers, the safetensors header and
TorchScript source text; it never decompresses a tensor record and never unpickles. What it
refuses, with the error code:

- any zip (TorchScript ``.pt``, torch.export ``.pt2``, ``.npz``): more than
  ``limits.max_entries`` entries, absolute or ``..`` names, duplicate names, compression other
  than stored/deflate, or records that expand past ``limits.max_expanded_bytes`` in total or past
  ``limits.max_ratio`` times the file's size (``archive_too_large`` for models,
  ``data_too_large`` for data; ``model_format`` / ``data_format`` for the rest);
- ``.npz``: a member that is not a ``.npy``, an object dtype (``data_pickle``), a header whose
  shape x itemsize exceeds the limit (``data_too_large``) or the member's stored size;
- ``.safetensors``: a header that declares more bytes than the limit or the file holds;
- ``.pt2``: any pickled part (``model_pickle``: a weight or constant marked ``use_pickle``, a
  custom- or opaque-object constant, a legacy ``data/weights|constants/<model>.pt``), AOTInductor
  native code, entries outside torch.export's layout, and graph nodes whose target is not an
  allowed operator (``model_unsafe_op``). The sample inputs are checked with torch's restricted
  unpickler by :func:`mpq_core.load_guard.check_sample_inputs`, from the bytes returned here;
- TorchScript: calls to operators outside the allow-list (``model_unsafe_op``,
  :mod:`mpq_core.script_guard`).

Pure Python (zipfile, json, ast, numpy's header reader): no torch import at module level.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from mpq_core.errors import DataError, ModelFormatError, MpqError
from mpq_core.expr_guard import guard_refusal, sympy_expr_refusal
from mpq_core.mapped_file import Buffer, as_file
from mpq_core.op_allowlist import export_target_refusal
from mpq_core.script_guard import check_script_pickles, check_script_sources

__all__ = [
    "ArchiveLimits",
    "check_export_archive",
    "check_model_archive",
    "check_npz",
    "check_safetensors",
    "check_torchscript_archive",
    "scan_zip",
]

Kind = Literal["model", "data"]
GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class ArchiveLimits:
    """How far an upload may expand once read. The service builds its own with
    :meth:`for_upload_limit`; the defaults suit a 2 GiB upload limit.

    Attributes:
        max_expanded_bytes: the most bytes all records of a zip (or all arrays of a data file)
            may declare together.
        max_ratio: the most the records may expand relative to the file's own size, beyond
            ``ratio_floor_bytes`` (deflate reaches ~1000:1 on zeros; real archives ~1-10:1).
        ratio_floor_bytes: expansion always allowed whatever the ratio (a small file of very
            compressible data is no threat).
        max_entries: the most entries a zip may list.
        max_text_bytes: the most bytes of JSON configs and TorchScript source read and parsed.
    """

    max_expanded_bytes: int = 4 * 2 * GiB
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 256 * MiB
    max_entries: int = 200_000
    max_text_bytes: int = 256 * MiB

    @classmethod
    def for_upload_limit(cls, max_upload_bytes: int, multiple: int = 4) -> ArchiveLimits:
        """Limits for a service that accepts uploads of up to ``max_upload_bytes``."""
        return cls(max_expanded_bytes=multiple * max_upload_bytes)

    def expansion_allowed(self, file_bytes: int) -> int:
        """The most bytes a file of ``file_bytes`` bytes may expand to."""
        by_ratio = max(int(self.max_ratio * file_bytes), self.ratio_floor_bytes)
        return min(self.max_expanded_bytes, by_ratio)


DEFAULT_LIMITS = ArchiveLimits()


def _error(kind: Kind, message: str, code: str) -> MpqError:
    return (
        ModelFormatError(message, code=code) if kind == "model" else DataError(message, code=code)
    )


def _too_large_code(kind: Kind) -> str:
    return "archive_too_large" if kind == "model" else "data_too_large"


def _bad_name(name: str) -> str | None:
    """Why a zip entry name is unsafe, or None."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' component"
    return None


def scan_zip(data: Buffer, kind: Kind, limits: ArchiveLimits = DEFAULT_LIMITS) -> zipfile.ZipFile:
    """Open ``data`` as a zip and check its central directory (nothing is decompressed).

    Returns the open archive, for reading the small entries the later checks need.

    Raises:
        ModelFormatError / DataError: see the module docstring for the codes.
    """
    fmt = "model_format" if kind == "model" else "data_format"
    try:
        zf = zipfile.ZipFile(as_file(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _error(kind, f"the zip archive is corrupt: {exc}", fmt) from exc
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _error(
            kind, f"the archive lists {len(infos)} entries (at most {limits.max_entries})", fmt
        )
    seen: set[str] = set()
    total = 0
    for info in infos:
        why = _bad_name(info.filename)
        if why is not None:
            raise _error(kind, f"the archive entry {info.filename!r} has {why}", fmt)
        if info.filename in seen:
            raise _error(kind, f"the archive lists {info.filename!r} twice", fmt)
        seen.add(info.filename)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _error(
                kind, f"the archive entry {info.filename!r} uses an unsupported compression", fmt
            )
        total += info.file_size
    allowed = limits.expansion_allowed(len(data))
    if total > allowed:
        raise _error(
            kind,
            f"the archive's records expand to {total} bytes, more than the {allowed} bytes "
            f"allowed for a {len(data)}-byte upload (at most {limits.max_ratio:g} times its "
            f"size and {limits.max_expanded_bytes} bytes in all); upload the file as written "
            "by torch/numpy, without extra or padded records",
            _too_large_code(kind),
        )
    return zf


def _read_small(zf: zipfile.ZipFile, name: str, budget: list[int], kind: Kind = "model") -> bytes:
    """Read one entry whose declared size fits what is left of ``budget[0]``."""
    size = zf.getinfo(name).file_size
    if size > budget[0]:
        raise _error(
            kind,
            f"the archive entry {name!r} declares {size} bytes, more than the "
            f"{budget[0]} bytes of configuration and source mpq reads",
            _too_large_code(kind),
        )
    budget[0] -= size
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        code = "model_corrupt" if kind == "model" else "data_format"
        raise _error(kind, f"the archive entry {name!r} is corrupt: {exc}", code) from exc


def _split_root(zf: zipfile.ZipFile) -> dict[str, str]:
    """Entry names relative to the archive's one top-level folder (torch's layout): rel -> name."""
    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ModelFormatError(
            "the model archive's entries are not all inside one top-level folder, as "
            "torch.jit.save and torch.export.save write them",
            code="model_format",
        )
    return {n.split("/", 1)[1]: n for n in names}


def check_model_archive(
    data: Buffer, fmt: Literal["torchscript", "export"], limits: ArchiveLimits = DEFAULT_LIMITS
) -> dict[str, bytes]:
    """Every intake check of a model archive whose format is already detected.

    Returns:
        For torch.export, the sample-input records (name -> bytes) that torch would load; the
        caller checks them with the restricted unpickler. Empty for TorchScript.
    """
    zf = scan_zip(data, "model", limits)
    if fmt == "torchscript":
        check_torchscript_archive(zf, limits)
        return {}
    return check_export_archive(zf, limits)


def check_torchscript_archive(zf: zipfile.ZipFile, limits: ArchiveLimits) -> None:
    """Parse every ``code/**.py`` entry and refuse operators outside the allow-list; read every
    pickle's opcodes (without running them) and refuse globals TorchScript never writes."""
    rel = _split_root(zf)
    budget = [limits.max_text_bytes]
    sources = {
        r: _read_small(zf, name, budget)
        for r, name in rel.items()
        if r.startswith("code/") and r.endswith(".py")
    }
    check_script_sources(sources)
    pickles = {r: _read_small(zf, name, budget) for r, name in rel.items() if r.endswith("pkl")}
    check_script_pickles(pickles)


# --- torch.export (.pt2) ----------------------------------------------------------------------

_PT2_FIXED = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)
_MODEL = r"[A-Za-z0-9_.\-]+"
_PT2_PATTERNS = (
    re.compile(rf"models/({_MODEL})\.json"),
    re.compile(rf"data/weights/({_MODEL})_weights_config\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(rf"data/constants/({_MODEL})_constants_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
    re.compile(rf"data/sample_inputs/({_MODEL})\.pt"),
    re.compile(r"extra/.+"),  # read as text only (extra_files)
)
_PICKLE_PT2_MESSAGE = (
    "the torch.export archive holds a pickled part ({what}), which loading would unpickle and "
    "so run arbitrary code; mpq refuses it. Re-export the model with plain tensors as weights, "
    "buffers and constants (no tensor subclasses, no custom objects) using torch.export.save"
)


def _pt2_refusal(rel: str) -> MpqError | None:
    """The error for an entry outside torch.export's layout, or None when it belongs."""
    if rel in _PT2_FIXED or any(p.fullmatch(rel) for p in _PT2_PATTERNS):
        return None
    if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
        what = f"the legacy pickled file {rel}"
        return ModelFormatError(_PICKLE_PT2_MESSAGE.format(what=what), code="model_pickle")
    if re.search(r"(custom_obj_|opaque_obj_)", rel) or rel.endswith((".pkl", ".pt")):
        what = f"the pickled object {rel}"
        return ModelFormatError(_PICKLE_PT2_MESSAGE.format(what=what), code="model_pickle")
    if rel.startswith("data/aotinductor/"):
        return ModelFormatError(
            "the torch.export archive holds AOTInductor compiled native code, which mpq never "
            "loads; save the ExportedProgram itself with torch.export.save",
            code="model_unsafe_op",
        )
    return ModelFormatError(
        f"the torch.export archive holds an unexpected entry {rel!r}; upload the file written "
        "by torch.export.save as it is",
        code="model_format",
    )


def check_export_archive(zf: zipfile.ZipFile, limits: ArchiveLimits) -> dict[str, bytes]:
    """Check a torch.export archive's layout, payload configs and graph node targets.

    Returns the sample-input records (relative name -> bytes) for the restricted-unpickler check.
    """
    rel = _split_root(zf)
    for r in rel:
        err = _pt2_refusal(r)
        if err is not None:
            raise err
    budget = [limits.max_text_bytes]
    models = [m.group(1) for r in rel if (m := _PT2_PATTERNS[0].fullmatch(r))]
    if not models:
        raise ModelFormatError(
            "the torch.export archive holds no program (models/<name>.json)", code="model_format"
        )
    samples: dict[str, bytes] = {}
    for model in models:
        for config in (
            f"data/weights/{model}_weights_config.json",
            f"data/constants/{model}_constants_config.json",
        ):
            if config in rel:
                entries = _check_payload_config(_json(zf, rel[config], budget), config)
                _check_payload_sizes(entries, config.rsplit("/", 1)[0], zf, rel, limits)
        _check_program(_json(zf, rel[f"models/{model}.json"], budget), model)
        sample = f"data/sample_inputs/{model}.pt"
        if sample in rel:
            raw = _read_small(zf, rel[sample], budget)
            scan_zip(raw, "model", limits)  # torch.save's own zip: no bomb inside either
            samples[sample] = raw
    return samples


def _json(zf: zipfile.ZipFile, name: str, budget: list[int]) -> Any:
    raw = _read_small(zf, name, budget)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelFormatError(
            f"the torch.export archive's {name.split('/', 1)[1]} is not valid JSON",
            code="model_corrupt",
        ) from exc


def _check_payload_config(config: Any, where: str) -> dict[str, dict[str, Any]]:
    """Every weight/constant must be a raw tensor record, never a pickle or an object.

    Returns the config's entries (fqn -> payload meta)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ModelFormatError(f"{where} is not a payload config", code="model_corrupt")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise ModelFormatError(f"{where}: entry {fqn!r} is malformed", code="model_corrupt")
        path = str(meta.get("path_name", ""))
        if meta.get("use_pickle") is not False or not re.fullmatch(r"(weight|tensor)_\d+", path):
            what = f"{fqn!r} stored as {path!r}" + (
                " with use_pickle" if meta.get("use_pickle") else ""
            )
            raise ModelFormatError(_PICKLE_PT2_MESSAGE.format(what=what), code="model_pickle")
    return entries


def _check_payload_sizes(
    entries: dict[str, dict[str, Any]],
    folder: str,
    zf: zipfile.ZipFile,
    rel: dict[str, str],
    limits: ArchiveLimits,
) -> None:
    """torch allocates ``torch.zeros(sizes)`` for an empty record: its declared sizes must be
    within the limit, and an empty record must hold an empty tensor."""
    for fqn, meta in entries.items():
        sizes: Any = (meta.get("tensor_meta") or {}).get("sizes")
        try:
            dims: list[int] = [int(d["as_int"]) for d in sizes]
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelFormatError(f"{fqn!r} has malformed sizes", code="model_corrupt") from exc
        numel = math.prod(dims)
        record = rel.get(f"{folder}/{meta['path_name']}")
        if record is None:
            raise ModelFormatError(f"{fqn!r}: its record is missing", code="model_corrupt")
        if numel > limits.max_expanded_bytes or (numel > 0 and zf.getinfo(record).file_size == 0):
            raise ModelFormatError(
                f"the torch.export archive declares {fqn!r} with {numel} elements but stores "
                f"{zf.getinfo(record).file_size} bytes for it; upload the file torch.export.save "
                "wrote",
                code="archive_too_large",
            )


def _strings(obj: Any, keys: frozenset[str]) -> Iterator[tuple[str, str]]:
    """Every (key, string) under one of ``keys``, in the program and all nested subgraphs."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for key, value in cur.items():
                if key in keys and isinstance(value, str):
                    yield key, value
                else:
                    stack.append(value)
        elif isinstance(cur, list):
            stack.extend(cur)


#: What the torch.export loader does with each kind of string, and the check for it.
_PROGRAM_STRINGS: dict[str, Callable[[str], str | None]] = {
    "target": export_target_refusal,  # resolved with getattr on torch and called
    "as_operator": export_target_refusal,
    "expr_str": sympy_expr_refusal,  # sympy.sympify, i.e. eval
}


def _check_program(program: Any, model: str) -> None:
    """Refuse a program naming anything but allowed operators, or carrying Python code."""
    guards = program.get("guards_code", []) if isinstance(program, dict) else []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise ModelFormatError("the program's guards_code is malformed", code="model_corrupt")
    found = list(_strings(program, frozenset(_PROGRAM_STRINGS)))
    found += [("guards_code", g) for g in guards]
    for key, text in found:
        check = guard_refusal if key == "guards_code" else _PROGRAM_STRINGS[key]
        why = check(text)
        if why is not None:
            raise ModelFormatError(
                f"the torch.export program '{model}' holds {key} {text[:200]!r} ({why}), which "
                "torch would evaluate as Python; mpq only loads programs made of pure tensor "
                "operators and shape expressions: remove that call (or custom op) and export again",
                code="model_unsafe_op",
            )


# --- data files ---------------------------------------------------------------------------------


def check_npz(data: bytes, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
    """Zip checks, then each member's ``.npy`` header (only its first bytes are inflated)."""
    zf = scan_zip(data, "data", limits)
    total = 0
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise DataError(
                f"the .npz holds {info.filename!r}, which is not a .npy array; save the data "
                "with np.savez",
                code="data_format",
            )
        nbytes = _npy_nbytes(zf, info, limits)
        total += nbytes
        if total > limits.max_expanded_bytes:
            raise DataError(
                f"the .npz arrays declare {total} bytes, more than the {limits.max_expanded_bytes}"
                " bytes allowed; use fewer or smaller calibration samples",
                code="data_too_large",
            )


def _npy_nbytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> int:
    """The bytes one ``.npy`` member's header declares; refuses object dtypes and lies."""
    import numpy as np

    name = info.filename
    try:
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = reader(fh)  # safe literal parsing, 10 kB header cap
            header_end = fh.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, TypeError) as exc:
        raise DataError(
            f"array {name!r} has a corrupt .npy header: {exc}", code="data_format"
        ) from exc
    if dtype.hasobject:
        raise DataError(
            f"array {name!r} holds Python objects, which need pickle to load; store plain "
            "numeric arrays",
            code="data_pickle",
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_expanded_bytes:
        raise DataError(
            f"array {name!r} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes), more "
            f"than the {limits.max_expanded_bytes} bytes allowed; use fewer calibration samples",
            code="data_too_large",
        )
    if nbytes > info.file_size - header_end:
        raise DataError(
            f"array {name!r} declares shape {tuple(shape)} ({nbytes} bytes) but stores only "
            f"{info.file_size - header_end} bytes; the file is corrupt",
            code="data_format",
        )
    return nbytes


_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def check_safetensors(data: bytes, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
    """Each tensor's header-declared size must fit the limit and lie inside the file."""
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, 100 * MiB):
        raise DataError("the .safetensors header is larger than the file", code="data_format")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:
        raise DataError(
            f"the .safetensors header is not valid JSON: {exc}", code="data_format"
        ) from exc
    if not isinstance(header, dict):
        raise DataError("the .safetensors header is not a JSON object", code="data_format")
    payload = len(data) - 8 - header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = [int(d) for d in meta["shape"]]
            begin, end = (int(x) for x in meta["data_offsets"])
            itemsize = _SAFETENSORS_ITEMSIZE.get(meta["dtype"], 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"tensor {name!r}: malformed safetensors header", code="data_format"
            ) from exc
        nbytes = math.prod(shape) * itemsize
        if nbytes > limits.max_expanded_bytes:
            raise DataError(
                f"tensor {name!r} declares shape {tuple(shape)} ({nbytes} bytes), more than the "
                f"{limits.max_expanded_bytes} bytes allowed; use fewer calibration samples",
                code="data_too_large",
            )
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= payload:
            raise DataError(
                f"tensor {name!r} lies outside the .safetensors file; the file is corrupt",
                code="data_format",
            )
