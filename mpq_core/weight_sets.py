"""Sets of parameter values, by name, for a loaded model's parameters.

Evaluation and fine-tuning need the float model's outputs beside the quantized model's. Rather
than keep the float outputs of every sample (samples x positions x classes floats: gigabytes for
a language model), they swap the float weights in for one batch and back after it, so memory
stays at the model plus one batch. The swap points each parameter at the other set's tensor
and back (its ``.data``), copying nothing: a third set of weights to park the current values in
would cost another copy of the model (2 GB for a 1B decoder in bfloat16). Outside the swap
every parameter has its own storage again, so what finds layers by storage (activation
quantization, the capture) finds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from mpq_core.intake import LoadedModel

__all__ = ["WeightSet", "copy_weights", "load_weights", "swapped_in"]

#: Parameter values by qualified parameter name (as in ``LoadedModel.named_weights``).
WeightSet = dict[str, torch.Tensor]


def copy_weights(model: LoadedModel, names: Iterable[str] | None = None) -> WeightSet:
    """Copies of the model's current values of the parameters ``names`` (all when None)."""
    params = model.named_weights()
    chosen = params if names is None else {n: params[n] for n in names}
    return {n: p.detach().clone() for n, p in chosen.items()}


@torch.no_grad()
def load_weights(model: LoadedModel, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's parameters of the same names, in place."""
    params = model.named_weights()
    for name, value in weights.items():
        params[name].copy_(value)


@contextmanager
def swapped_in(model: LoadedModel, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The parameters named in ``weights`` hold those tensors inside the block and their own
    values again after it (also on error). Nothing is copied.

    Only forward passes belong inside: the parameters share the given tensors' storage there,
    so an in-place update would change ``weights``, and what finds layers by storage does not
    find them.

    Raises:
        ValueError: a tensor whose shape, dtype or device differs from its parameter's.

    Example:
        >>> with swapped_in(model, float_weights):  # doctest: +SKIP
        ...     reference = model(*inputs)
    """
    params = model.named_weights()
    # Distinct parameter objects on one storage (a tied weight) all take the new tensor.
    aliases: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}
    for _, param in model.module.named_parameters():
        aliases.setdefault((param.data_ptr(), tuple(param.shape)), []).append(param)
    own: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, value in weights.items():
            p = params[name]
            if (value.shape, value.dtype, value.device) != (p.shape, p.dtype, p.device):
                raise ValueError(
                    f"{name}: a {value.dtype} {tuple(value.shape)} tensor on {value.device} "
                    f"cannot stand in for the parameter ({p.dtype} {tuple(p.shape)} on {p.device})"
                )
            for alias in aliases.get((p.data_ptr(), tuple(p.shape)), [p]):
                own.append((alias, alias.data))
                # ``.data`` swaps the tensor's storage in place: TorchScript and torch.export
                # programs hold the same tensor object, so they run with the new values.
                alias.data = value
        yield
    finally:
        for alias, data in reversed(own):
            alias.data = data
