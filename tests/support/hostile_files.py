"""Hostile model and data files, built by the tests themselves (nothing hostile is checked in).

Each builder returns the file's bytes. The live exploits write a *marker file* when their payload
runs, so a test can assert that loading through mpq did not run it (and, as a control, that stock
torch does).

- torch.export: a weight marked ``use_pickle`` whose pickle runs code
  (:func:`pt2_pickled_weight`), the sample-inputs ``weights_only=False`` fallback
  (:func:`pt2_pickled_sample_inputs`), an opaque-object constant (plain ``pickle.loads``), and
  structural variants (custom objects, legacy ``.pt`` files, AOTInductor code, graph targets
  that are not operators);
- TorchScript: a scripted ``forward`` calling ``torch.from_file`` (:class:`ReadsFiles`), a
  scripted ``__setstate__`` that calls it at load time (:class:`TouchesOnLoad`, creates the
  marker), hand-edited source (:func:`edit_script_source`), a 1 GiB deflated record;
- zips in general: duplicate, ``..`` and absolute names, records outside the root folder;
- data: a ``savez_compressed``-style bomb, a ``.npy`` header declaring a huge shape, object
  arrays, safetensors headers that lie.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "ReadsFiles",
    "TouchesOnLoad",
    "deflated_zeros_member",
    "edit_json_entry",
    "edit_script_source",
    "npy_bytes",
    "npy_header",
    "npz_bomb",
    "npz_entries",
    "npz_with_header",
    "pt2_guard_code",
    "pt2_opaque_constant",
    "pt2_pickled_sample_inputs",
    "pt2_pickled_weight",
    "pt2_sympy_expr",
    "rewrite_zip",
    "safetensors_with_header",
    "script_bytes",
    "small_export",
    "small_script",
    "torchscript_bomb",
]

GiB = 1024**3


class Payload:
    """Pickles to ``exec(code)``: unpickling it with ``weights_only=False`` writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        code = f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('payload ran')"
        return exec, (code,)


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def small_export(*, dynamic: bool = False) -> bytes:
    """A genuine, harmless torch.export archive (the base the .pt2 exploits edit); with a
    dynamic batch dimension, its shapes are sympy expressions (``expr_str``)."""
    torch.manual_seed(0)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    program = torch.export.export(_Small().eval(), (torch.randn(2, 4),), dynamic_shapes=shapes)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def script_bytes(module: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def small_script() -> bytes:
    """A genuine, harmless TorchScript archive."""
    torch.manual_seed(0)
    return script_bytes(_Small().eval())


def rewrite_zip(
    data: bytes,
    replace: Mapping[str, bytes | None] | None = None,
    *,
    extra: list[tuple[str, bytes]] | None = None,
    under_root: bool = True,
) -> bytes:
    """A copy of zip ``data`` with entries replaced (None drops one) and ``extra`` appended.

    Names are relative to the archive's top-level folder when ``under_root`` (torch's layout);
    ``extra`` may repeat a name (duplicate entries).
    """
    replace = dict(replace or {})
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are the point
    src = zipfile.ZipFile(io.BytesIO(data))
    root = src.namelist()[0].split("/", 1)[0] + "/" if under_root else ""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            rel = info.filename.removeprefix(root)
            if rel in replace:
                new = replace.pop(rel)
                if new is not None:
                    dst.writestr(info.filename, new)
            else:
                dst.writestr(info.filename, src.read(info.filename))
        for rel, new in list(replace.items()) + list(extra or []):
            if new is not None:
                dst.writestr(root + rel, new)
    return out.getvalue()


def edit_json_entry(data: bytes, rel: str, edit: Callable[[dict], None]) -> bytes:
    """A copy of archive ``data`` whose JSON entry ``rel`` is changed in place by ``edit``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    root = src.namelist()[0].split("/", 1)[0] + "/"
    config = json.loads(src.read(root + rel))
    edit(config)
    return rewrite_zip(data, {rel: json.dumps(config).encode()})


def pt2_pickled_weight(marker: Path) -> bytes:
    """Exploit 1 of issue 9: a weight marked ``use_pickle`` whose pickle runs code."""
    paths: list[str] = []

    def mark(config: dict) -> None:
        config["config"]["fc.weight"]["use_pickle"] = True
        paths.append(config["config"]["fc.weight"]["path_name"])

    edited = edit_json_entry(small_export(), "data/weights/model_weights_config.json", mark)
    return rewrite_zip(edited, {f"data/weights/{paths[0]}": _torch_save(Payload(marker))})


def pt2_pickled_sample_inputs(marker: Path) -> bytes:
    """Exploit 2: sample inputs that fail ``weights_only=True``, which torch retries with
    ``weights_only=False``, running the pickle."""
    return rewrite_zip(
        small_export(), {"data/sample_inputs/model.pt": _torch_save(Payload(marker))}
    )


def pt2_opaque_constant(marker: Path) -> bytes:
    """An opaque-object constant: torch's loader calls plain ``pickle.loads`` on it."""

    def add(config: dict) -> None:
        config["config"]["evil"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    edited = edit_json_entry(small_export(), "data/constants/model_constants_config.json", add)
    return rewrite_zip(edited, {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))})


def _python_writing(marker: Path) -> str:
    return f"__import__('pathlib').Path('{marker}').write_text('payload ran')"


def pt2_sympy_expr(marker: Path) -> bytes:
    """A symbolic shape whose ``expr_str`` is Python: torch's loader ``sympy.sympify``s it,
    which evaluates it."""

    def edit(program: dict) -> None:
        stack: list[object] = [program]
        while stack:
            cur = stack.pop()
            if isinstance(cur, dict):
                if "expr_str" in cur:
                    cur["expr_str"] = _python_writing(marker)
                stack.extend(cur.values())
            elif isinstance(cur, list):
                stack.extend(cur)

    return edit_json_entry(small_export(dynamic=True), "models/model.json", edit)


def pt2_guard_code(marker: Path) -> bytes:
    """A ``guards_code`` entry that ``ExportedProgram.module()`` pastes into a function it
    ``exec``s; the guard runs on every call of the module."""

    def edit(program: dict) -> None:
        program["guards_code"] = [f"L['x'].size()[1] == 4 and {_python_writing(marker)} > 0"]

    return edit_json_entry(small_export(), "models/model.json", edit)


class ReadsFiles(nn.Module):
    """A scripted ``forward`` that reads any file of the machine through ``torch.from_file``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leak = torch.from_file(self.path, False, 4, dtype=torch.uint8)
        return self.fc(x) + leak.float().sum()


class TouchesOnLoad(nn.Module):
    """A scripted ``__setstate__``, run by ``torch.jit.load`` itself, that creates ``marker``
    (``torch.from_file(..., shared=True)`` creates a missing file)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return (self.marker, self.training, self.weight)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.marker = state[0]
        self.training = state[1]
        touched = torch.from_file(self.marker, True, 16, dtype=torch.uint8)
        self.weight = state[2] + touched.float().sum() * 0.0  # used: not optimised away


def edit_script_source(data: bytes, edit: Callable[[str], str]) -> bytes:
    """A TorchScript archive whose top-level class source is rewritten by ``edit``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    root = src.namelist()[0].split("/", 1)[0] + "/"
    rel = next(
        n.removeprefix(root)
        for n in src.namelist()
        if n.endswith(".py") and "/code/__torch__/tests/" in n
    )
    return rewrite_zip(data, {rel: edit(src.read(root + rel).decode()).encode()})


def deflated_zeros_member(zf: zipfile.ZipFile, name: str, prefix: bytes, zeros: int) -> None:
    """Write ``prefix`` + ``zeros`` zero bytes as one deflated member, streamed (no big buffer)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(1 << 24)
    with zf.open(info, "w", force_zip64=True) as fh:
        fh.write(prefix)
        left = zeros
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n


def torchscript_bomb(zeros: int = GiB) -> bytes:
    """A real TorchScript archive with an extra deflated record of ``zeros`` zero bytes
    (~1 MB on disk for 1 GiB)."""
    base = small_script()
    src = zipfile.ZipFile(io.BytesIO(base))
    root = src.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        deflated_zeros_member(dst, f"{root}/data/99", b"", zeros)
    return out.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A version 1.0 ``.npy`` header for ``shape`` (no data)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    body = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


def npz_bomb(zeros: int = 3 * GiB // 2) -> bytes:
    """What ``np.savez_compressed(input=np.zeros(...))`` writes for ``zeros`` bytes of float32
    zeros, built without allocating them (~1.5 MB for 1.5 GiB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        deflated_zeros_member(dst, "input.npy", npy_header((zeros // 4,)), zeros)
    return out.getvalue()


def npz_with_header(shape: tuple[int, ...], data: bytes = b"", descr: str = "<f4") -> bytes:
    """An ``.npz`` whose ``input.npy`` declares ``shape`` but stores only ``data``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        dst.writestr("input.npy", npy_header(shape, descr) + data)
    return out.getvalue()


def npz_entries(entries: list[tuple[str, bytes]]) -> bytes:
    """An ``.npz``-like zip with exactly these members (duplicates and odd names allowed)."""
    warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are the point
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, content in entries:
            info = zipfile.ZipInfo(name)
            dst.writestr(info, content)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def safetensors_with_header(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload
