"""The test zoo of real architectures: ``transformers`` models (tests/zoo_hf.py) and the
torchvision/timm patterns and plain-torch layers (tests/zoo_torch.py), by name."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from tests.zoo_hf import HF_ZOO, ZooEntry
from tests.zoo_torch import TORCH_ZOO

__all__ = ["ZOO", "ZooEntry", "build"]

ZOO: dict[str, Callable[[], ZooEntry]] = {**HF_ZOO, **TORCH_ZOO}


def build(name: str, dtype: torch.dtype = torch.float32) -> ZooEntry:
    """A freshly built, seeded entry in eval mode, its floating parameters in ``dtype``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = ZOO[name]()
    entry.module.eval()
    if dtype != torch.float32:
        entry.module.to(dtype)
        make = entry.inputs

        def cast(n: int, seed: int) -> list[torch.Tensor]:
            return [t.to(dtype) if t.is_floating_point() else t for t in make(n, seed)]

        entry.inputs = cast
    return entry
