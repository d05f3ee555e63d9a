"""Fixtures of the engine's command-line tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import zoo_data


def write_cnn_files(
    folder: Path, zoo_bytes: Callable[[str, str], bytes], samples: int
) -> tuple[Path, Path]:
    """The zoo's TorchScript CNN as ``model.pt`` and ``samples`` labelled inputs as
    ``calib.npz`` in ``folder``: what the command-line tests run."""
    model = folder / "model.pt"
    model.write_bytes(zoo_bytes("cnn", "script"))
    data = zoo_data("cnn", samples)
    assert data.labels is not None
    npz = folder / "calib.npz"
    np.savez(npz, input=data.inputs[0].numpy(), labels=data.labels.numpy())
    return model, npz


@pytest.fixture
def cnn_files(tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]) -> tuple[Path, Path]:
    """A TorchScript CNN and 24 labelled samples for it, as files."""
    return write_cnn_files(tmp_path, zoo_bytes, 24)
