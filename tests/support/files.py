"""Small data files built in memory for tests and benchmarks (never pickled)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["mlp_data_npz", "npz_bytes"]


def npz_bytes(*, compressed: bool = False, **arrays: np.ndarray) -> bytes:
    """An ``.npz`` archive of ``arrays`` (``np.savez`` or ``np.savez_compressed``)."""
    buf = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def mlp_data_npz(n: int = 32, seed: int = 0) -> bytes:
    """Calibration data for a 16-input, 5-class MLP: ``input`` (n, 16) float32 and ``labels``."""
    rng = np.random.default_rng(seed)
    return npz_bytes(
        input=rng.standard_normal((n, 16)).astype(np.float32), labels=rng.integers(0, 5, n)
    )
