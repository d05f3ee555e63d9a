"""Device selection of a job (the CUDA path itself is checked by bench/gpu_pipeline.py on a GPU)."""

from __future__ import annotations

import pytest
import torch

from mpq_core.errors import SpecError
from mpq_core.pipeline import resolve_device
from mpq_core.spec import JobSpec


def test_auto_is_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(SpecError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_spec_accepts_devices(device: str) -> None:
    assert JobSpec(budgets=["avg-bits=4"], device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", ""])
def test_spec_refuses_other_devices(device: str) -> None:
    with pytest.raises(SpecError, match="device"):
        JobSpec(budgets=["avg-bits=4"], device=device)
