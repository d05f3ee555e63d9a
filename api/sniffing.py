"""Cheap container sniffing of an upload's first bytes: is it a model or a data file, and which.

The sniffers look at the container only, from the first few KiB
(:data:`api.upload_stream.HEAD_BYTES`). A zip's central directory sits at its *end*, so sniffing
from the head is best effort: it reads the local file headers that happen to be visible. It
refuses what is clearly wrong (a torch.save pickle, a .npy, an unknown file) at upload time; the
worker loads the complete file with ``mpq_core.intake.detect_format`` /
``mpq_core.data.load_data`` and does the real validation (truncated archives, frozen
TorchScript, missing arrays, ...). Error codes match those modules.

This module never imports torch.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Literal

from mpq_core.errors import DataError, ModelFormatError

__all__ = ["sniff_data_format", "sniff_model_format"]

_LFH = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LFH_SIG = b"PK\x03\x04"
_NAME_OK = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True)
class _Entry:
    name: str
    method: int  # 0 stored, 8 deflated
    data_offset: int  # offset of the entry's data in the file


def _zip_entries(head: bytes) -> list[_Entry]:
    """Local file headers visible in ``head``, the first one at offset 0.

    torch's zip writer sets the data-descriptor flag (sizes follow the data), so the next header
    cannot be found by skipping; every plausible ``PK\\x03\\x04`` is parsed instead and kept only
    if its name is printable ASCII of sane length (tensor bytes rarely fake that).
    """
    entries: list[_Entry] = []
    off = 0
    while off >= 0 and off + _LFH.size <= len(head):
        fields = _LFH.unpack_from(head, off)
        nlen, xlen = fields[9], fields[10]
        raw = head[off + _LFH.size : off + _LFH.size + nlen]
        name = raw.decode("ascii", "replace")
        if 0 < nlen <= 512 and len(raw) == nlen and _NAME_OK.fullmatch(name):
            entries.append(_Entry(name, fields[3], off + _LFH.size + nlen + xlen))
            start = off + _LFH.size + nlen
        elif off == 0:
            return []
        else:
            start = off + 4
        off = head.find(_LFH_SIG, start)
    return entries


def _relative(name: str) -> str:
    # torch archives put every entry under one top folder ("archive/", or the file's stem).
    return name.split("/", 1)[1] if "/" in name else name


_EXPORT_PREFIXES = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/")
_PICKLE_ENTRIES = {"byteorder", ".format_version", ".storage_alignment"}
_PICKLE_MESSAGE = (
    "this is a pickled nn.Module or state_dict (torch.save); mpq never unpickles uploads because "
    "loading them runs arbitrary code. Export the model instead: "
    "torch.jit.save(torch.jit.script(model), 'model.pt') or "
    "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
)
_FORMAT_MESSAGE = (
    "not a TorchScript archive or torch.export program; save the model with "
    "torch.jit.save(torch.jit.script(model), 'model.pt') or "
    "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
)


def sniff_model_format(head: bytes) -> Literal["torchscript", "export"]:
    """Tell a TorchScript archive from a torch.export program by the first bytes of the file.

    Best effort (see the module docstring): an archive accepted here may still be refused by
    the worker (truncated, frozen, corrupt).

    Raises:
        ModelFormatError: code ``model_pickle`` for torch.save files (zip or legacy pickle),
            ``model_format`` for anything else that is not one of the two formats.
    """
    if not head:
        raise ModelFormatError("the model file is empty", code="model_format")
    if head[:4] != _LFH_SIG:
        if head[:1] == b"\x80":  # pickle PROTO opcode: torch.save's legacy format
            raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
        raise ModelFormatError(_FORMAT_MESSAGE, code="model_format")
    entries = _zip_entries(head)
    if not entries:
        raise ModelFormatError(
            "the model file starts like a zip archive but its first entry is corrupt; "
            + _FORMAT_MESSAGE,
            code="model_format",
        )
    rel = [_relative(e.name) for e in entries]
    if any(
        r in ("archive_format", "archive_version") or r.startswith(_EXPORT_PREFIXES) for r in rel
    ):
        return "export"
    if any(r.startswith("code/") or r == "constants.pkl" for r in rel):
        return "torchscript"
    if rel[0] == "data.pkl" or any(r in _PICKLE_ENTRIES for r in rel):
        # torch.save writes data.pkl first; TorchScript writes its tensors first. A TorchScript
        # archive without tensors starts with data.pkl too, but its pickle names __torch__ classes.
        first = entries[0]
        if first.method == 0 and b"__torch__" in head[first.data_offset :]:
            return "torchscript"
        raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
    if re.fullmatch(r"data/\d+", rel[0]):  # TorchScript's first entries are its tensors
        return "torchscript"
    if all(e.name.endswith(".npy") for e in entries):
        raise ModelFormatError(
            "this looks like an .npz data file, not a model; upload it as a dataset. "
            + _FORMAT_MESSAGE,
            code="model_format",
        )
    raise ModelFormatError(
        "a zip file that is neither a TorchScript archive nor a torch.export program",
        code="model_format",
    )


_NPY_MAGIC = b"\x93NUMPY"
_OBJECT_DESCR = re.compile(r"'\|?O'")
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit
_DATA_MESSAGE = (
    "data must be a .npz (np.savez) or .safetensors file holding 'input' (or 'input_0', "
    "'input_1', ...) and optional 'labels'"
)


def _npy_header(data: bytes) -> str | None:
    """The dict text of a .npy header at the start of ``data``, if all of it is there."""
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        return None
    if data[6] == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif len(data) >= 12:
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        return None
    text = data[start : start + hlen]
    return text.decode("latin-1") if len(text) == hlen else None


def sniff_data_format(head: bytes, size: int | None = None) -> Literal["npz", "safetensors"]:
    """Tell an ``.npz`` from a ``.safetensors`` file by its first bytes (``size``: the whole
    file's size, when known, to check the safetensors header length against).

    Best effort (see the module docstring): the worker checks the arrays themselves.

    Raises:
        DataError: code ``data_pickle`` when the first .npz array visibly needs pickle (object
            dtype), ``data_format`` for anything that is neither format.
    """
    if not head:
        raise DataError("the data file is empty", code="data_format")
    if head[:4] == _LFH_SIG:
        entries = _zip_entries(head)
        if not entries:
            raise DataError("the .npz file is corrupt: bad first zip entry", code="data_format")
        first = entries[0]
        if not first.name.endswith(".npy"):
            hint = ""
            if any(_relative(e.name) in ("data.pkl", "constants.pkl") for e in entries) or any(
                _relative(e.name).startswith(("data/", "code/", "models/")) for e in entries
            ):
                hint = "this looks like a model archive, not data; upload it as a model. "
            raise DataError(
                f"{hint}a zip file that is not an .npz (no .npy arrays); {_DATA_MESSAGE}",
                code="data_format",
            )
        if first.method == 0:
            header = _npy_header(head[first.data_offset :])
            if header is not None and _OBJECT_DESCR.search(header):
                raise DataError(
                    f"the .npz holds arrays that need pickle to load ({first.name[:-4]!r} has "
                    "dtype object); store plain numeric arrays",
                    code="data_pickle",
                )
        return "npz"
    if head[:6] == _NPY_MAGIC:
        raise DataError(
            "this is a single .npy array; save a .npz with np.savez('data.npz', input=x, labels=y)",
            code="data_format",
        )
    if len(head) >= 10:
        (hlen,) = struct.unpack_from("<Q", head, 0)
        fits = size is None or hlen <= size - 8
        if head[8:9] == b"{" and 0 < hlen <= _SAFETENSORS_MAX_HEADER and fits:
            return "safetensors"
    if head[:1] == b"\x80":
        raise DataError(
            "this is a pickle (torch.save or pickle.dump); mpq never unpickles uploads. "
            + _DATA_MESSAGE,
            code="data_format",
        )
    raise DataError(_DATA_MESSAGE, code="data_format")
