"""A user's model as a fresh torch.export program module, whatever format it was uploaded in,
for the runtime exports to record again (:mod:`mpq_core.compressed_model`,
:mod:`mpq_core.onnx_export`).

A torch.export upload already is one. A TorchScript upload is translated by torch's own
TorchScript converter (``torch._export.converter``, private and partial: a model it cannot
translate is refused with what it said).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mpq_core.intake import LoadedModel

__all__ = ["ConversionRefused", "Positional", "batch_dynamic_shapes", "program_module"]


class ConversionRefused(Exception):
    """The model could not be translated to a torch.export program; the message says why."""


def program_module(model: LoadedModel, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """A fresh module running the model's program: its parameters may be removed or replaced
    without touching ``model``.

    Raises:
        ConversionRefused: torch's TorchScript converter could not translate the model.
    """
    if model.format == "export":
        return model.program.module()
    try:  # private and partial, hence the broad guard
        from torch._export.converter import TS2EPConverter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(model.module, example).convert()  # type: ignore[arg-type]
    except Exception as exc:
        raise ConversionRefused(
            "torch's TorchScript converter could not translate this model "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    return program.module()


class Positional(nn.Module):
    """``inner`` called with positional inputs only, the form :func:`batch_dynamic_shapes`
    describes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


def batch_dynamic_shapes(example: tuple[torch.Tensor, ...], fixed: bool) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` for a ``forward(*args)``: the batch dimension of every input left to
    torch.export to keep dynamic where the program allows (None for a fixed-batch model)."""
    if fixed:
        return None
    return (tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example),)
