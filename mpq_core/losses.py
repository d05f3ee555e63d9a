"""Per-sample losses the sensitivities are measured with.

* ``ce`` (labels given): cross entropy of the class scores against the labels (empirical Fisher,
  as in Chen et al.). Outputs ``(N, C)`` with labels ``(N,)``, or ``(N, T, C)`` with ``(N, T)``
  (summed over positions).
* ``ce`` without labels: cross entropy against labels *drawn from the model's own predictive
  distribution* (one draw per sample, fixed seed): a Monte-Carlo estimate of the true Fisher,
  which needs no labels and, unlike arg-max pseudo labels, does not vanish on confident samples.
* ``mse`` (outputs that are not class scores): the Fisher of a unit-variance Gaussian on the
  outputs, ``E ||J dW||^2`` (Gauss-Newton), estimated with one standard-normal probe ``z`` per
  sample: the per-sample loss is ``<z, f(x)>``, whose gradient ``J^T z`` has
  ``E <J^T z, dW>^2 = ||J dW||^2``. So Omega predicts half the mean squared output change.

``auto`` picks ``ce`` for floating outputs of rank 2 or 3 with at least two classes, else ``mse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mpq_core.errors import SpecError
from mpq_core.spec import Loss

__all__ = ["PerSampleLoss", "resolve_loss_kind"]


def resolve_loss_kind(kind: str, output: torch.Tensor) -> Literal["ce", "mse"]:
    if kind == "ce":
        if output.dim() not in (2, 3):
            raise SpecError(
                "loss 'ce' needs class scores of shape (N, C) or (N, T, C), "
                f"got {tuple(output.shape)}"
            )
        return "ce"
    if kind == "mse":
        return "mse"
    if kind != Loss.AUTO:
        raise SpecError(f"unknown loss {kind!r}; use one of {', '.join(Loss)}")
    if output.is_floating_point() and output.dim() in (2, 3) and output.shape[-1] >= 2:
        return "ce"
    return "mse"


@dataclass
class PerSampleLoss:
    """A per-sample loss whose random targets are fixed per sample index, so every pass over the
    data (and every perturbed copy of the model) sees the same targets.

    Args:
        kind: ``ce`` or ``mse`` (see the module docstring), already resolved.
        seed: seed of the label draws / Gaussian probes.
    """

    kind: Literal["ce", "mse"]
    seed: int = 0

    def _draws(self, start: int, count: int, per_sample: torch.Size, normal: bool) -> torch.Tensor:
        # One generator per sample, seeded by the sample's index: a sample gets the same draw
        # whatever batch it lands in, so results do not depend on the batch size.
        out = torch.empty(count, *per_sample)
        for k in range(count):
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + start + k)
            out[k] = (
                torch.randn(per_sample, generator=g)
                if normal
                else torch.rand(per_sample, generator=g)
            )
        return out

    def targets(
        self, output: torch.Tensor, labels: torch.Tensor | None, start: int
    ) -> torch.Tensor:
        """The targets for a batch starting at sample ``start``; fixed per sample index."""
        out = output.detach().float()
        n = out.shape[0]
        if self.kind == "mse":
            return self._draws(start, n, out.shape[1:], normal=True).to(out.device)
        if labels is not None:
            return labels.to(out.device)
        # Inverse-CDF sampling from the model's own predictive distribution.
        cdf = torch.softmax(out, dim=-1).cumsum(dim=-1).cpu()
        u = self._draws(start, n, out.shape[1:-1], normal=False).unsqueeze(-1)
        drawn = (cdf < u).sum(dim=-1).clamp_max(out.shape[-1] - 1)
        return drawn.to(out.device)

    def __call__(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss per sample, shape ``(N,)``."""
        out = output.float()
        if self.kind == "mse":
            return (out * targets).reshape(out.shape[0], -1).sum(dim=1)
        if out.dim() == 2:
            return F.cross_entropy(out, targets, reduction="none")
        per_pos = F.cross_entropy(
            out.reshape(-1, out.shape[-1]), targets.reshape(-1), reduction="none"
        )
        return per_pos.reshape(out.shape[0], -1).sum(dim=1)
