"""Sets of parameter values, by name, copied into a loaded model's parameters in place.

Evaluation and fine-tuning need the float model's outputs beside the quantized model's. Rather
than keep the float outputs of every sample (samples x positions x classes floats: gigabytes for
a language model), they swap the float weights in for one batch and the quantized ones back, so
memory stays at the model plus one batch. The values are copied into the existing parameters, so
each parameter keeps its storage: what finds layers by storage (activation quantization, the
optimiser) still finds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from mpq_core.intake import LoadedModel

__all__ = ["WeightSet", "copy_weights", "load_weights", "store_weights", "swapped_in"]

#: Parameter values by qualified parameter name (as in ``LoadedModel.named_weights``).
WeightSet = dict[str, torch.Tensor]


def copy_weights(model: LoadedModel, names: Iterable[str] | None = None) -> WeightSet:
    """Copies of the model's current values of the parameters ``names`` (all when None)."""
    params = model.named_weights()
    chosen = params if names is None else {n: params[n] for n in names}
    return {n: p.detach().clone() for n, p in chosen.items()}


@torch.no_grad()
def store_weights(model: LoadedModel, target: WeightSet) -> None:
    """Copy the model's current values of the parameters named in ``target`` into its tensors
    (allocated once by the caller, so a loop that stores every step allocates nothing)."""
    params = model.named_weights()
    for name, buffer in target.items():
        buffer.copy_(params[name])


@torch.no_grad()
def load_weights(model: LoadedModel, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's parameters of the same names, in place."""
    params = model.named_weights()
    for name, value in weights.items():
        params[name].copy_(value)


@contextmanager
def swapped_in(
    model: LoadedModel, weights: Mapping[str, torch.Tensor], restore: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """The model holds ``weights`` inside the block and ``restore`` after it (also on error).

    Example:
        >>> with swapped_in(model, float_weights, quantized):  # doctest: +SKIP
        ...     reference = model(*inputs)
    """
    load_weights(model, weights)
    try:
        yield
    finally:
        load_weights(model, restore)
