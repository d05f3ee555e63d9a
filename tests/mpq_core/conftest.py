"""Fixtures of the engine's command-line tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import zoo_data


@pytest.fixture
def cnn_files(tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]) -> tuple[Path, Path]:
    """A TorchScript CNN and 24 labelled samples for it, as files."""
    model = tmp_path / "model.pt"
    model.write_bytes(zoo_bytes("cnn", "script"))
    data = zoo_data("cnn", 24)
    assert data.labels is not None
    npz = tmp_path / "calib.npz"
    np.savez(npz, input=data.inputs[0].numpy(), labels=data.labels.numpy())
    return model, npz
