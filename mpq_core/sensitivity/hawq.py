"""HAWQ-V2 sensitivity (Dong et al., NeurIPS 2020): Hessian trace times quantization error.

``omega[l][b] = 1/2 * tr(H_l) / params_l * ||Q_b(W_l) - W_l||^2``, where ``H_l`` is the Hessian
of the mean calibration loss with respect to layer ``l``'s weight. The trace is estimated with
Hutchinson's method: for Rademacher vectors ``v`` over all layer weights at once,
``E[v_l^T (H v)_l] = tr(H_l)`` (cross-layer terms vanish in expectation). Each iteration is one
pass over the whole calibration set, in batches, with the same ``v`` for every batch.

How ``H v`` is computed (:func:`hutchinson_traces` reports which in ``TraceEstimate.hessian``):

* ``double_backward`` (the default whenever it works): ``g = autograd.grad(L, W,
  create_graph=True)``, then ``Hv = autograd.grad(g, W, grad_outputs=v)``. TorchScript modules
  run with the optimising executor off (``capture_context``) and torch.export modules are plain
  ATen graphs. Scaled dot-product attention is forced onto its math backend, because the fused
  CPU/GPU kernels (flash, memory-efficient) have no second derivative; with that, every model
  of the test zoo (CNN, MLP, attention encoder, LSTM; TorchScript and torch.export) uses
  double backward.
* ``finite_difference``, the fallback when double backward raises (an op without a
  second derivative): ``Hv ~ (g(W + eps v) - g(W - eps v)) / (2 eps)``, with ``eps`` ``1e-3``
  times the RMS of all layer weights (one step for all layers, so the quotient estimates
  ``H v`` itself); costs two forward+backward passes per iteration.
  Note that on ReLU networks the difference also sees activations switching on or off within
  ``eps``, which the (piecewise) autograd Hessian ignores, so the two can differ noticeably.

The loss is the calibration loss of :mod:`mpq_core.losses` (cross entropy against the labels,
or against labels drawn from the model when there are none). For non-class outputs (loss kind
``mse``) the random-probe loss ``<z, f(x)>`` has a Hessian whose expectation is zero, so HAWQ
uses ``1/2 ||f(x) - f_float(x)||^2`` instead, whose Hessian at the float weights is exactly the
Gauss-Newton matrix ``J^T J`` that the Fisher table also approximates. A negative trace estimate
(possible away from a minimum, or from noise) is clamped to zero so Omega stays non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, select_output
from mpq_core.losses import PerSampleLoss, resolve_loss_kind
from mpq_core.profiling import ModelProfile
from mpq_core.progress import ProgressFn, counted
from mpq_core.quant_primitives import output_major, quantization_errors
from mpq_core.runner import Batch, iter_batches
from mpq_core.scheme import QuantScheme

__all__ = ["HessianMethod", "TraceEstimate", "hawq_sensitivity", "hutchinson_traces"]

HessianMethod = Literal["auto", "double_backward", "finite_difference"]

_FD_REL_EPS = 1e-3


@dataclass
class TraceEstimate:
    """Hutchinson estimates of ``tr(H_l)`` per layer and how they were obtained."""

    traces: list[float]
    iterations: int
    hessian: Literal["double_backward", "finite_difference"]


class _Objective:
    """The mean calibration loss, batch by batch, with targets fixed on first use."""

    def __init__(
        self,
        model: LoadedModel,
        data: CalibrationData,
        batch_size: int,
        loss: str,
        seed: int,
        output_key: Any = None,
    ) -> None:
        self.model = model
        self.output_key = output_key
        self.batches: list[Batch] = list(iter_batches(model, data, batch_size))
        self.n = data.num_samples
        # Targets are fixed at the float weights, before any perturbation; one batch's outputs
        # at a time (a language model's are positions x vocabulary a sample).
        self.kind = ""
        self.loss_fn = PerSampleLoss("mse", seed=seed)
        self.targets: list[torch.Tensor] = []
        for batch in self.batches:
            with capture_context(grad=False):
                out = select_output(model(*batch.inputs), output_key)[: batch.valid].detach()
            if not self.kind:
                self.kind = resolve_loss_kind(loss, out)
                self.loss_fn = PerSampleLoss(self.kind, seed=seed)
            if self.kind == "mse":
                self.targets.append(out.float().clone())
            else:
                labels = batch.labels[: batch.valid] if batch.labels is not None else None
                self.targets.append(self.loss_fn.targets(out, labels, batch.start))
            del out

    def batch_loss(self, i: int) -> torch.Tensor:
        """Batch ``i``'s share of the mean loss (sum over its real samples / N); grad enabled."""
        batch = self.batches[i]
        out = select_output(self.model(*batch.inputs), self.output_key)[: batch.valid]
        target = self.targets[i]
        if self.kind == "mse":
            per_sample = 0.5 * ((out.float() - target) ** 2).reshape(out.shape[0], -1).sum(dim=1)
        else:
            per_sample = self.loss_fn(out, target)
        return per_sample.sum() / self.n


def _grads(
    loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool
) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]


def _hv_double_backward(
    obj: _Objective, params: list[torch.Tensor], v: list[torch.Tensor]
) -> list[torch.Tensor]:
    hv = [torch.zeros_like(p) for p in params]
    for i in range(len(obj.batches)):
        loss = obj.batch_loss(i)
        grads = _grads(loss, params, create_graph=True)
        idx = [k for k, g in enumerate(grads) if g.requires_grad]
        if not idx:  # the loss is linear in every weight: zero Hessian
            continue
        part = torch.autograd.grad(
            [grads[k] for k in idx],
            params,
            grad_outputs=[v[k] for k in idx],
            allow_unused=True,
        )
        for k, h in enumerate(part):
            if h is not None:
                hv[k] += h.detach()
    return hv


def _full_grad(obj: _Objective, params: list[torch.Tensor]) -> list[torch.Tensor]:
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(obj.batches)):
        for t, g in zip(total, _grads(obj.batch_loss(i), params, False), strict=True):
            t += g
    return total


def _hv_finite_difference(
    obj: _Objective,
    params: list[torch.Tensor],
    v: list[torch.Tensor],
    originals: list[torch.Tensor],
    eps: float,
) -> list[torch.Tensor]:
    grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, w, vk in zip(params, originals, v, strict=True):
                p.copy_(w + (sign * eps) * vk)
        grads.append(_full_grad(obj, params))
    with torch.no_grad():
        for p, w in zip(params, originals, strict=True):
            p.copy_(w)
    return [(gp - gm) / (2.0 * eps) for gp, gm in zip(*grads, strict=True)]


# Over 80 lines on purpose: the probe loop, its fallback from double backward to finite
# differences and the early stop share one state, and one try/finally restores the weights
# (finite differences perturb them) whatever happens inside.
def hutchinson_traces(
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    *,
    iterations: int = 200,
    batch_size: int = 64,
    loss: str = "auto",
    seed: int = 0,
    output_key: Any = None,
    progress: ProgressFn | None = None,
    tol: float | None = None,
    hessian: HessianMethod = "auto",
) -> TraceEstimate:
    """Hutchinson estimates of the trace of each layer's Hessian block of the mean loss.

    Args:
        iterations: number of Rademacher probes (each one pass over the calibration set).
        tol: stop early once the running mean of the total trace changes by less than this
            relative amount between iterations (as PyHessian does); ``None`` runs them all.
        hessian: how ``H v`` is formed; ``auto`` tries double backward and falls back to
            finite differences of gradients if it raises.
    """
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    weights = model.named_weights()
    params = [weights[layer.name] for layer in profile.layers]
    originals = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    # One step size for every layer, so that the difference quotient estimates H v itself.
    numel = sum(w.numel() for w in originals)
    sq = sum(float(w.double().pow(2).sum()) for w in originals)
    eps = max(_FD_REL_EPS * (sq / max(numel, 1)) ** 0.5, 1e-6)
    method: Literal["double_backward", "finite_difference"] = (
        "finite_difference" if hessian == "finite_difference" else "double_backward"
    )
    sums = [0.0] * len(params)
    done = 0
    hv: list[torch.Tensor] = []
    try:
        for p in params:
            p.requires_grad_(True)
        with capture_context(grad=True), sdpa_kernel([SDPBackend.MATH]):
            obj = _Objective(model, data, batch_size, loss, seed, output_key)
            prev_mean: float | None = None
            for it in range(iterations):
                v = [
                    (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype)
                    for p in params
                ]
                if method == "double_backward":
                    try:
                        hv = _hv_double_backward(obj, params, v)
                    except RuntimeError:
                        if hessian == "double_backward":
                            raise
                        method = "finite_difference"
                if method == "finite_difference":
                    hv = _hv_finite_difference(obj, params, v, originals, eps)
                for k, (vk, hk) in enumerate(zip(v, hv, strict=True)):
                    sums[k] += float((vk.double() * hk.double()).sum())
                done = it + 1
                if progress is not None:
                    progress("hawq", done / iterations, counted(done, iterations, "iterations"))
                mean_total = sum(sums) / done
                if (
                    tol is not None
                    and prev_mean is not None
                    and abs(mean_total - prev_mean) / (abs(prev_mean) + 1e-6) < tol
                ):
                    break
                prev_mean = mean_total
    finally:
        with torch.no_grad():
            for p, w, flag in zip(params, originals, flags, strict=True):
                p.copy_(w)
                p.requires_grad_(flag)
    if progress is not None and done < iterations:
        progress("hawq", 1.0, {})
    return TraceEstimate(traces=[s / done for s in sums], iterations=done, hessian=method)


def hawq_sensitivity(
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    bits: list[int],
    *,
    iterations: int = 200,
    batch_size: int = 64,
    loss: str = "auto",
    seed: int = 0,
    output_key: Any = None,
    progress: ProgressFn | None = None,
    tol: float | None = None,
    hessian: HessianMethod = "auto",
    scheme: QuantScheme | None = None,
) -> list[list[float]]:
    """``omega[l][j] = 1/2 * max(tr(H_l), 0) / params_l * ||Q_{bits[j]}(W_l) - W_l||^2``.

    Example:
        >>> hawq_sensitivity(model, data, profile, [2, 4, 8], iterations=50)  # doctest: +SKIP
    """
    est = hutchinson_traces(
        model,
        data,
        profile,
        iterations=iterations,
        batch_size=batch_size,
        loss=loss,
        seed=seed,
        output_key=output_key,
        progress=progress,
        tol=tol,
        hessian=hessian,
    )
    weights = model.named_weights()
    omega: list[list[float]] = []
    for layer, trace in zip(profile.layers, est.traces, strict=True):
        w = output_major(weights[layer.name].detach(), layer.transposed)
        per_param = max(trace, 0.0) / max(layer.params, 1)
        errors = (
            quantization_errors(w, bits, scheme=scheme)
            .double()
            .pow(2)
            .reshape(len(bits), -1)
            .sum(1)
        )
        omega.append([0.5 * per_param * float(e) for e in errors])
    return omega
