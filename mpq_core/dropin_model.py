"""The drop-in quantized model (``model.pt`` / ``model.pt2``): the uploaded model in its own
format with the dequantized weights, loadable with stock torch (no mpq needed to run it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mpq_core.atomic_write import file_target, write_atomic
from mpq_core.intake import LoadedModel
from mpq_core.quantized_weights import QuantizedLayer, apply_weights, model_parameters

__all__ = ["save_quantized_model"]


@contextmanager
def _applied(model: LoadedModel, layers: dict[str, QuantizedLayer]) -> Iterator[None]:
    """The model with the layers' dequantized weights, its float weights restored on exit."""
    params = model_parameters(model)
    saved = {name: params[name].detach().clone() for name in layers if name in params}
    try:
        apply_weights(model, layers)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def save_quantized_model(
    model: LoadedModel, layers: dict[str, QuantizedLayer], path: str | Path
) -> None:
    """Write the drop-in quantized model (``model.pt`` / ``model.pt2``): the model in its own
    format with the dequantized weights, loadable with stock ``torch.jit.load`` /
    ``torch.export.load``. The caller's model is left with its float weights.

    Args:
        path: the file to write, or a directory to write ``model`` + ``model.suffix`` into.
    """
    target = file_target(path, "model" + model.suffix)
    with _applied(model, layers):
        write_atomic(target, model.save)
