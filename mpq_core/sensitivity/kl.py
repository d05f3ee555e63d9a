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
from mpq_core.losses import resolve_loss_kind
from mpq_core.profiling import ModelProfile
from mpq_core.progress import ProgressFn
from mpq_core.quant_primitives import quantization_errors
from mpq_core.runner import Batch, iter_batches
from mpq_core.scheme import QuantScheme

__all__ = ["kl_sensitivity", "output_divergence"]


def output_divergence(reference: torch.Tensor, other: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distortion of ``other`` against ``reference`` (shape ``(N,)``, float64).

    Args:
        reference: the float model's outputs.
        other: the perturbed model's outputs, same shape.
        kind: ``ce`` for ``KL(softmax(reference) || softmax(other))`` (summed over positions),
            ``mse`` for half the squared distance.
    """
    ref = reference.detach().double()
    oth = other.detach().double()
    n = ref.shape[0]
    if kind == "ce":
        logp = F.log_softmax(ref, dim=-1)
        logq = F.log_softmax(oth, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)
        return kl.reshape(n, -1).sum(dim=1).clamp_min(0.0)
    return 0.5 * ((oth - ref) ** 2).reshape(n, -1).sum(dim=1)


def _outputs(model: LoadedModel, batches: list[Batch], output_key: Any) -> list[torch.Tensor]:
    with capture_context(grad=False):
        return [select_output(model(*b.inputs), output_key)[: b.valid].detach() for b in batches]


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
    batches = list(iter_batches(model, data, batch_size))
    n = data.num_samples
    total_steps = len(profile.layers) * len(bits) + 1
    reference = _outputs(model, batches, output_key)
    kind = resolve_loss_kind(loss, reference[0])
    if progress is not None:
        progress("kl", 1 / total_steps, {})
    omega: list[list[float]] = []
    step = 1
    for layer in profile.layers:
        param = weights[layer.name]
        original = param.detach().clone()
        row: list[float] = []
        errors = quantization_errors(original, bits, scheme=scheme)
        try:
            for error in errors:
                with torch.no_grad():
                    param.copy_(original + error)
                outs = _outputs(model, batches, output_key)
                total = sum(
                    float(output_divergence(ref, out, kind).sum())
                    for ref, out in zip(reference, outs, strict=True)
                )
                row.append(total / n)
                step += 1
                if progress is not None:
                    progress("kl", step / total_steps, {})
        finally:
            with torch.no_grad():
                param.copy_(original)
        omega.append(row)
    return omega
