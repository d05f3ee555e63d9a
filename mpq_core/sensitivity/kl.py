"""KL sensitivity: the measured output distortion of quantizing one layer at a time.

For every layer ``l`` and candidate bit width ``b`` the layer's weight is replaced by
``Q_b(W_l)`` (all other layers stay float), the calibration set is run, and the distortion of
the outputs against the float outputs (computed once) is averaged over samples:

* class scores (loss kind ``ce``): ``KL(softmax(f) || softmax(f_q))`` over the last dimension,
  summed over positions for ``(N, T, C)`` outputs;
* anything else (loss kind ``mse``): ``1/2 ||f - f_q||^2`` per sample, i.e. the KL divergence of
  unit-variance Gaussians centred on the outputs. This is the same scale as the Fisher table,
  whose ``mse`` loss predicts half the mean squared output change.

Both are, to second order, ``1/2 dW^T F dW`` with the true Fisher ``F``, so the table is on the
scale of the second-order model. The cost is one forward pass over the calibration set per
(layer, bit width) pair, which is what makes this the expensive, "ground truth" baseline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, select_output
from mpq_core.layers import transposed_names
from mpq_core.losses import resolve_loss_kind
from mpq_core.profiling import ModelProfile
from mpq_core.progress import ProgressFn, counted
from mpq_core.runner import Batch, iter_batches
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity.layer_errors import LayerErrors

__all__ = ["kl_sensitivity", "output_divergence"]


# Samples are compared a few at a time, so the float64 temporaries of a language model's logits
# (positions x vocabulary each) stay at this many elements whatever the batch.
_CHUNK_ELEMENTS = 2**22


def output_divergence(reference: torch.Tensor, other: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distortion of ``other`` against ``reference`` (shape ``(N,)``, float64).

    Args:
        reference: the float model's outputs.
        other: the perturbed model's outputs, same shape.
        kind: ``ce`` for ``KL(softmax(reference) || softmax(other))`` (summed over positions),
            ``mse`` for half the squared distance.
    """
    n = reference.shape[0]
    per = max(1, _CHUNK_ELEMENTS // max(reference[:1].numel(), 1))
    return torch.cat(
        [
            _divergence(reference[s : s + per], other[s : s + per], kind)
            for s in range(0, max(n, 1), per)
        ]
    )


def _divergence(reference: torch.Tensor, other: torch.Tensor, kind: str) -> torch.Tensor:
    ref = reference.detach().double()
    oth = other.detach().double()
    n = ref.shape[0]
    if kind == "ce":
        logp = F.log_softmax(ref, dim=-1)
        logq = F.log_softmax(oth, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)
        return kl.reshape(n, -1).sum(dim=1).clamp_min(0.0)
    return 0.5 * ((oth - ref) ** 2).reshape(n, -1).sum(dim=1)


def _output(model: LoadedModel, batch: Batch, output_key: Any) -> torch.Tensor:
    with capture_context(grad=False):
        return select_output(model(*batch.inputs), output_key)[: batch.valid].detach()


def kl_sensitivity(
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    bits: list[int],
    *,
    batch_size: int = 64,
    loss: str = "auto",
    output_key: Any = None,
    progress: ProgressFn | None = None,
    scheme: QuantScheme | None = None,
) -> list[list[float]]:
    """``omega[l][j]``: mean output divergence when only layer ``l`` is quantized to ``bits[j]``.

    Weights are restored bit-exactly afterwards, also when a forward pass raises.

    Example:
        >>> omega = kl_sensitivity(model, data, profile, [2, 4, 8])  # doctest: +SKIP
        >>> len(omega) == len(profile.layers)  # doctest: +SKIP
        True
    """
    weights = model.named_weights()
    names = [layer.name for layer in profile.layers]
    errors = LayerErrors(weights, names, bits, scheme, transposed_names(profile.layers))
    sums = torch.zeros(len(names), len(bits), dtype=torch.float64)
    batches = list(iter_batches(model, data, batch_size))
    kind: str | None = None
    total, done = len(batches) * len(names) * len(bits), 0
    # Batch by batch, so only one batch's float outputs are ever held (a language model's are
    # samples x positions x vocabulary); every layer and width is scored against them.
    for batch in batches:
        reference = _output(model, batch, output_key)
        kind = kind or resolve_loss_kind(loss, reference)
        for i, name in enumerate(names):
            param = weights[name]
            original = param.detach().clone()
            stack = errors[name]
            try:
                for j in range(len(bits)):
                    with torch.no_grad():
                        param.copy_(original + stack[j])
                    out = _output(model, batch, output_key)
                    sums[i, j] += float(output_divergence(reference, out, kind).sum())
                    done += 1
                    if progress is not None:
                        progress("kl", done / total, counted(done, total, "passes"))
            finally:
                with torch.no_grad():
                    param.copy_(original)
    return (sums / data.num_samples).tolist()
