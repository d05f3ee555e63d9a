"""Calibration data: ``.npz`` or ``.safetensors`` holding ``input`` (or ``input_0``, ``input_1``,
...) and optional ``labels``. Never unpickles anything.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpq_core.archive_guard import DEFAULT_LIMITS, ArchiveLimits, check_npz, check_safetensors
from mpq_core.errors import DataError

__all__ = ["CalibrationData", "load_data"]

_INPUT_KEY = re.compile(r"input_(\d+)")


@dataclass
class CalibrationData:
    """Positional model inputs (all with the same first, sample, dimension) and labels."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = {t.shape[0] if t.dim() else -1 for t in self.inputs}
        if len(n) != 1 or -1 in n:
            raise DataError(
                "every input array needs the same number of samples along its first axis; "
                f"got shapes {[tuple(t.shape) for t in self.inputs]}",
                code="data_shape",
            )
        if self.labels is not None and self.labels.shape[0] != self.num_samples:
            raise DataError(
                f"'labels' has {self.labels.shape[0]} entries but the inputs have "
                f"{self.num_samples} samples",
                code="data_shape",
            )

    @property
    def num_samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def subset(self, index: slice | torch.Tensor) -> CalibrationData:
        labels = self.labels[index] if self.labels is not None else None
        return CalibrationData([t[index] for t in self.inputs], labels)

    def batches(self, batch_size: int) -> Iterator[CalibrationData]:
        for start in range(0, self.num_samples, batch_size):
            yield self.subset(slice(start, start + batch_size))


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise DataError(
            f"the .npz holds arrays that need pickle to load ({exc}); store plain numeric arrays",
            code="data_pickle",
        ) from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"the .npz file is corrupt or truncated: {exc}", code="data_format"
        ) from exc


def _read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return dict(load(data))
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise DataError(f"the .safetensors file is corrupt: {exc}", code="data_format") from exc


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _to_tensor(name: str, arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)  # models are float32; float64 data is a common accident
    if arr.dtype.kind not in "fiub":
        raise DataError(
            f"array {name!r} has dtype {arr.dtype}; use numeric arrays", code="data_dtype"
        )
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_data(
    source: str | Path | bytes, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> CalibrationData:
    """Read calibration data from an ``.npz`` or ``.safetensors`` file (detected by content).

    Headers are checked first (:mod:`mpq_core.archive_guard`): no array is
    read whose declared size exceeds ``limits`` or the file, and no object array.

    Example:
        >>> np.savez("calib.npz", input=x, labels=y)  # doctest: +SKIP
        >>> load_data("calib.npz").num_samples  # doctest: +SKIP
        512
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data[:4] == b"PK\x03\x04":
        check_npz(data, limits)
        arrays = _read_npz(data)
    elif _is_safetensors(data):
        check_safetensors(data, limits)
        arrays = _read_safetensors(data)
    elif data[:6] == b"\x93NUMPY":
        raise DataError(
            "this is a single .npy array; save a .npz with np.savez('data.npz', input=x, labels=y)",
            code="data_format",
        )
    else:
        raise DataError(
            "data must be a .npz (np.savez) or .safetensors file holding 'input' (or 'input_0', "
            "'input_1', ...) and optional 'labels'",
            code="data_format",
        )
    if "input" in arrays:
        inputs = [_to_tensor("input", arrays["input"])]
        if any(_INPUT_KEY.fullmatch(k) for k in arrays):
            raise DataError(
                "use either 'input' or 'input_0', 'input_1', ..., not both", code="data_keys"
            )
    else:
        idx = sorted(int(m.group(1)) for k in arrays if (m := _INPUT_KEY.fullmatch(k)))
        if not idx:
            raise DataError(
                f"no 'input' array in the data (found {sorted(arrays)}); name the model input "
                "'input', or 'input_0', 'input_1', ... for several inputs",
                code="data_keys",
            )
        if idx != list(range(len(idx))):
            raise DataError(
                f"input arrays must be numbered input_0..input_{len(idx) - 1} without gaps",
                code="data_keys",
            )
        inputs = [_to_tensor(f"input_{i}", arrays[f"input_{i}"]) for i in idx]
    labels = None
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.dtype.kind not in "iu":
            raise DataError(
                f"'labels' must hold integer class ids, got dtype {lab.dtype}", code="data_dtype"
            )
        labels = torch.from_numpy(lab.astype(np.int64))
    return CalibrationData(inputs=inputs, labels=labels)
