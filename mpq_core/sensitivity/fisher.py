"""Fisher sensitivities (Chen et al., ICCV 2021): Omega[l][b] = 1/2 mean_n <g_n,l, dW_l(b)>^2.

Per-sample gradients are never formed for all layers at once and no backward pass is run per
sample. One batched forward records each quantizable op's input ``x`` (``capture.py``); one
batched backward delivers the gradient ``delta`` at each op's output. For an op linear in its
weight, ``y = f(x; W)``, the per-sample directional derivative is

    <g_n, dW> = sum over sample n's outputs of  delta . f(x; dW)

so each (layer, bit width) costs one application of the layer to its own input with the
quantization error as weight (conv, embedding), or, for linear layers, one contraction of the
per-sample gradient ``delta_n^T x_n`` with every ``dW_b`` at once. The weights of fused
recurrent kernels (an LSTM on the CPU) take one backward pass per sample; a layer whose output
the batch shares and whose path to the batch cannot be followed (``shared_flow.py``) falls back
to a five-point finite difference of the per-sample losses.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from mpq_core.capture import LayerCapture, OpRecord, WeightRef, capture_context, shape_only
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel, select_output
from mpq_core.layers import transposed_names
from mpq_core.losses import PerSampleLoss, resolve_loss_kind
from mpq_core.profiling import ModelProfile, rows_of
from mpq_core.progress import ProgressFn, counted, null_progress
from mpq_core.runner import iter_batches
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity.layer_errors import LayerErrors
from mpq_core.shared_flow import per_sample_directional_shared

__all__ = [
    "WORKSPACE_BYTES",
    "contraction_dtype",
    "fisher_sensitivity",
    "per_sample_directional",
]

aten = torch.ops.aten

# Per-sample gradients of a linear layer are materialised in chunks of at most this many floats.
_CHUNK_FLOATS = 2**24
#: What one contraction holds beside the batch's graph, whatever the batch: a chunk of
#: per-sample gradients and its product with the perturbations.
WORKSPACE_BYTES = 2 * 4 * _CHUNK_FLOATS
# Finite-difference step: the perturbation's norm as a fraction of the weight's norm. Fixed
# relative to the weight (not to the quantization error, which is 64x smaller at 8 bits than at
# 2 bits) so the loss change stays well above float32 rounding at every bit width.
_FD_RELATIVE_STEP = 0.02


def contraction_dtype(weights: list[torch.Tensor]) -> torch.dtype:
    """The dtype the per-sample contractions of linear layers run in: bfloat16 when every
    scored weight is bfloat16, else float32.

    A bfloat16 model's activations and gradients already carry bfloat16's rounding (a
    relative 2^-9); contracting them in bfloat16, with float32 accumulation, moved a 2048x8192
    layer's products by 0.19% (relative, over 16 samples and six widths) and ran 2.2x faster
    than float32 on a CPU with AVX512-BF16 (with AMX, bfloat16 matmuls run about 15x float32).
    float16 keeps float32: its range would flush small gradients to zero.
    """
    if weights and all(w.dtype == torch.bfloat16 for w in weights):
        return torch.bfloat16
    return torch.float32


def _rows_to_samples(values: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """Sum per-row values ``(R, ...)`` into per-sample values ``(n, ...)``."""
    r = values.shape[0]
    if r == n:
        return values
    if layout == "interleaved":
        return values.reshape(r // n, n, *values.shape[1:]).sum(0)
    return values.reshape(n, r // n, *values.shape[1:]).sum(1)


def _sample_rows(rows: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """Regroup rows ``(R, d)`` as ``(n, R/n, d)`` with each sample's rows together."""
    r = rows.shape[0]
    if layout == "interleaved":
        return rows.reshape(r // n, n, -1).transpose(0, 1)
    return rows.reshape(n, r // n, -1)


def per_sample_directional(
    rec: OpRecord, delta: torch.Tensor, dws: torch.Tensor, n: int, layout: str
) -> torch.Tensor:
    """``<g_n, dW_b>`` for every sample ``n`` and every perturbation ``dws[b]``: ``(n, B)``.

    Args:
        rec: the recorded op (its input activation and configuration).
        delta: the loss gradient with respect to the op's output.
        dws: the weight perturbations stacked, ``(B, *weight.shape)``.
        n: samples in the batch.
        layout: how the op's rows map to samples (``blocked`` or ``interleaved``).
    """
    nb = dws.shape[0]
    ct = contraction_dtype([dws])  # bfloat16 stacks are contracted in bfloat16
    if rec.kind == "linear" and rows_of(rec).shape[0] == n:
        # One row per sample: (delta_n dW_b) . x_n for all b in one matmul, no per-sample
        # gradient materialised.
        x1 = rows_of(rec).to(ct)  # (n, in)
        d1 = delta.reshape(n, -1).to(ct)  # (n, out)
        stacked = dws.to(ct).permute(1, 0, 2).reshape(dws.shape[1], -1)  # (out, B*in)
        return ((d1 @ stacked).reshape(n, nb, -1) * x1[:, None, :]).sum(-1).float()
    if rec.kind == "linear":
        x = _sample_rows(rows_of(rec).to(ct), n, layout)  # (n, T, in)
        d = _sample_rows(delta.reshape(-1, delta.shape[-1]).to(ct), n, layout)  # (n, T, out)
        return _linear_blocks(x, d, dws.to(ct))
    if rec.kind == "embedding":
        ids = rec.x.reshape(-1)
        d = delta.reshape(ids.shape[0], -1).float()  # (R, D)
        # Rows gathered before the conversion: a vocabulary's table is converted per row used.
        vals = torch.stack([(dws[b][ids].float() * d).sum(1) for b in range(nb)], dim=1)
        return _rows_to_samples(vals, n, layout)
    if rec.kind in ("conv1d", "conv2d"):
        return _conv_unfolded(rec, delta, dws, n)
    if rec.kind.startswith("conv"):
        return _conv_applied(rec, delta, dws)
    raise ValueError(f"no directional derivative for layer kind {rec.kind}")


def _linear_blocks(x: torch.Tensor, d: torch.Tensor, dws: torch.Tensor) -> torch.Tensor:
    """``<x_n^T d_n, dW_b>`` ``(n, B)`` from rows ``x`` ``(n, T, in)``, ``d`` ``(n, T, out)`` and
    ``dws`` ``(B, out, in)``: per-sample gradients formed a block of output rows at a time for
    as many samples as the workspace holds, so each block of ``dws`` is read once per group of
    samples rather than once per sample (a 2048x8192 layer's six widths are 400 MB of reads)."""
    n, nb, (out_dim, in_dim) = x.shape[0], dws.shape[0], dws.shape[1:]
    samples = max(1, min(n, _CHUNK_FLOATS // max(16 * in_dim, 1)))  # at least 16 rows a block
    total = torch.zeros(n, nb, dtype=torch.float32, device=x.device)
    for s in range(0, n, samples):
        xs, ds = x[s : s + samples], d[s : s + samples]
        rows = max(1, _CHUNK_FLOATS // (xs.shape[0] * in_dim))
        for o in range(0, out_dim, rows):
            g = torch.bmm(ds[:, :, o : o + rows].transpose(1, 2), xs)  # (n', rows, in)
            block = dws[:, o : o + rows].reshape(nb, -1)  # (B, rows*in)
            total[s : s + xs.shape[0]] += g.reshape(g.shape[0], -1) @ block.T
    return total


def _conv_unfolded(rec: OpRecord, delta: torch.Tensor, dws: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample weight gradients of a 1-D/2-D convolution from the unfolded input (one
    batched matmul, the cost of one convolution), contracted with every ``dW_b`` at once."""
    c = rec.conv
    x = rec.x.detach().float()
    d = delta.float()
    if rec.kind == "conv1d":  # as a 2-D convolution of height 1
        x, d = x.unsqueeze(2), d.unsqueeze(2)
        kernel, dil, pad, stride = (
            [1, *dws.shape[3:]],
            [1, *c["dilation"]],
            [0, *c["padding"]],
            [1, *c["stride"]],
        )
    else:
        kernel, dil, pad, stride = list(dws.shape[3:]), c["dilation"], c["padding"], c["stride"]
    groups = c["groups"]
    nb, cout = dws.shape[0], dws.shape[1]
    flat = dws.reshape(nb, -1).float()  # (B, Cout * Cin/g * k)
    cols = F.unfold(
        x, tuple(kernel), dilation=tuple(dil), padding=tuple(pad), stride=tuple(stride)
    )  # (n, Cin*k, L)
    cols = cols.reshape(n, groups, cols.shape[1] // groups, cols.shape[2])
    d = d.reshape(n, groups, cout // groups, -1)  # (n, g, Cout/g, L)
    per = max(1, _CHUNK_FLOATS // max(flat.shape[1] + cols[0].numel(), 1))
    parts = []
    for s in range(0, n, per):
        g = torch.matmul(
            d[s : s + per], cols[s : s + per].transpose(2, 3)
        )  # (n', g, Cout/g, Cin/g*k)
        parts.append(g.reshape(g.shape[0], -1) @ flat.T)
    return torch.cat(parts)


def _conv_applied(rec: OpRecord, delta: torch.Tensor, dws: torch.Tensor) -> torch.Tensor:
    """``sum delta * conv(x; dW_b)`` per sample: one convolution per bit width (3-D and
    transposed convolutions, where unfolding is not available)."""
    c = rec.conv
    x = rec.x.detach()
    out = []
    for b in range(dws.shape[0]):
        y = aten.convolution.default(
            x,
            dws[b].to(x.dtype),
            None,
            c["stride"],
            c["padding"],
            c["dilation"],
            c["transposed"],
            c["output_padding"],
            c["groups"],
        )
        out.append((y.float() * delta.float()).reshape(y.shape[0], -1).sum(1))
    return torch.stack(out, dim=1)


# Over 80 lines on purpose: one batch's forward capture, backward with scoring hooks and the
# finite-difference fallback share one autograd graph and one try/finally that restores
# requires_grad; split up, the graph (the batch's activations) would outlive each piece or a
# dozen tensors would be passed between them.
def fisher_sensitivity(
    model: LoadedModel,
    data: CalibrationData,
    profile: ModelProfile,
    bits: list[int],
    *,
    batch_size: int = 64,
    loss: str = "auto",
    output_key: Any = None,
    first_order: bool = False,
    progress: ProgressFn | None = None,
    scheme: QuantScheme | None = None,
) -> list[list[float]]:
    """Omega[l][b] = 1/2 mean_n <g_n,l, Q_b(W_l) - W_l>^2 for every layer of ``profile``.

    Memory is bounded by one batch: each op's output gradient is contracted with the layer's
    weight perturbations the moment the backward pass delivers it, and the op's recorded input
    is released then, so no batch ever holds every layer's gradients at once.

    Args:
        model: the loaded model.
        data: calibration data (labels optional: see ``losses.py`` for the label-free loss).
        profile: the layers to score, from ``profile_model``.
        bits: candidate bit widths.
        batch_size: samples per forward/backward pass.
        loss: ``auto``, ``ce`` or ``mse``.
        output_key: which element of a tuple/dict output to score.
        first_order: add the gradient term ``mean_n <g_n,l, dW_l(b)>`` that the paper drops
            (it assumes the model sits at a minimum of the calibration loss; on held-out
            calibration data it does not, and the term is exact for that data, if noisy).
        progress: called as ``progress("fisher", fraction, {})``.
        scheme: the weight quantizer's scheme (per-channel symmetric when None).

    Example:
        >>> profile = profile_model(model, data)  # doctest: +SKIP
        >>> omega = fisher_sensitivity(model, data, profile, [2, 4, 8])  # doctest: +SKIP
    """
    report = progress or null_progress
    weights = model.named_weights()
    layers = profile.layers
    index = {layer.name: i for i, layer in enumerate(layers)}
    refs = [WeightRef(layer.name, weights[layer.name]) for layer in layers]
    names = [layer.name for layer in layers]
    # A layer at a time, in the dtype the contractions read.
    dws = LayerErrors(
        weights,
        names,
        bits,
        scheme,
        transposed_names(layers),
        dtype=contraction_dtype([weights[name] for name in names]),
    )
    layouts = {layer.name: list(layer.extra.get("layouts", [])) for layer in layers}
    shared = {
        name: {i for i, lay in enumerate(ls) if lay == "shared"} for name, ls in layouts.items()
    }
    per_sample: PerSampleLoss | None = None
    sums = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    linear_sums = torch.zeros(len(layers), len(bits), dtype=torch.float64)
    params = [weights[layer.name] for layer in layers]
    requires = [p.requires_grad for p in params]
    batches = list(iter_batches(model, data, batch_size))
    try:
        for p in params:
            p.requires_grad_(True)
        for step, batch in enumerate(batches):
            n = batch.inputs[0].shape[0]
            cap = LayerCapture(refs, shared=shared, batch=n, release_outputs=True)
            with capture_context(grad=True), cap:
                out = select_output(model(*batch.inputs), output_key)
            cap.finish()
            if per_sample is None:
                per_sample = PerSampleLoss(resolve_loss_kind(loss, out))
            labels = batch.labels if per_sample.kind == "ce" else None
            targets = per_sample.targets(out, labels, batch.start)
            losses = per_sample(out, targets)
            del out  # the graph keeps what the backward pass needs; nothing else may
            records = [r for r in cap.records if r.kind != "rnn"]
            # Fused recurrent kernels (LSTM on CPU) hide their per-step products; a GRU that
            # runs as matrix products is scored exactly like any linear.
            rnn_names = list(dict.fromkeys(r.name for r in cap.records if r.kind == "rnn"))
            del cap
            scorer = _BatchScorer(records, layouts, dws, n)
            scorer.dots.update(
                _recurrent_directional(losses[: batch.valid], rnn_names, weights, dws)
            )
            _score_backward(scorer, losses[: batch.valid].sum(), params)
            del records, losses  # free this batch's activations
            by_difference = scorer.by_difference
            with torch.no_grad():
                for name in by_difference:
                    scorer.dots.pop(name, None)  # scored as a whole by finite differences
                for name, d in scorer.dots.items():
                    sums[index[name]] += (d[: batch.valid].double() ** 2).sum(0).cpu()
                    linear_sums[index[name]] += d[: batch.valid].double().sum(0).cpu()
            del scorer
            if by_difference:
                _finite_difference(
                    model,
                    batch,
                    per_sample,
                    targets,
                    output_key,
                    by_difference,
                    weights,
                    dws,
                    index,
                    sums,
                    linear_sums,
                )
            report("fisher", (step + 1) / len(batches), counted(step + 1, len(batches), "batches"))
    finally:
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
    omega = 0.5 * sums / data.num_samples
    if first_order:
        omega = omega + linear_sums / data.num_samples
    return omega.tolist()


class _BatchScorer:
    """One batch's ``<g_n, dW_b>`` per layer, summed over the layer's uses (``dots``), filled
    record by record as the backward pass reaches each op's output."""

    def __init__(
        self,
        records: list[OpRecord],
        layouts: dict[str, list[str]],
        dws: LayerErrors,
        n: int,
    ) -> None:
        self.records, self.dws, self.n = records, dws, n
        self.dots: dict[str, torch.Tensor] = {}
        self.by_difference: list[str] = []
        # Which rows of each use belong to which sample, by record index (forward order).
        self.layouts: dict[int, str] = {}
        seen: dict[str, int] = defaultdict(int)
        for k, rec in enumerate(records):
            use = seen[rec.name]
            seen[rec.name] += 1
            listed = layouts[rec.name]
            layout = listed[use] if use < len(listed) else "blocked"
            self.layouts[k] = "blocked" if layout == "shared" else layout  # one sample: its own

    def _add(self, name: str, d: torch.Tensor) -> None:
        self.dots[name] = self.dots[name] + d if name in self.dots else d

    @torch.no_grad()
    def score(self, k: int, delta: torch.Tensor) -> None:
        """Contract record ``k``'s output gradient with its layer's perturbations, then release
        the record's input: the backward pass has no further use for it through this record."""
        rec = self.records[k]
        dw = self.dws[rec.name].transpose(1, 2) if rec.transposed else self.dws[rec.name]
        self._add(rec.name, per_sample_directional(rec, delta, dw, self.n, self.layouts[k]))
        rec.x = shape_only(rec.x)

    def score_shared(self, flow_deltas: dict[int, torch.Tensor]) -> None:
        """The uses whose output the batch shares, once their consumers' gradients are in."""
        for rec in self.records:
            if rec.flow is None:
                continue
            d = _shared_directional(rec, self.dws[rec.name], flow_deltas, self.n)
            if d is not None:
                self._add(rec.name, d)
            elif rec.flow.failed and rec.name not in self.by_difference:
                self.by_difference.append(rec.name)


def _recurrent_directional(
    losses: torch.Tensor,
    names: list[str],
    weights: dict[str, torch.Tensor],
    dws: LayerErrors,
) -> dict[str, torch.Tensor]:
    """``<g_n, dW_b>`` ``(n, B)`` of the weights of fused recurrent kernels (an LSTM on the
    CPU runs all its steps in one op, whose per-step products are out of reach), from one
    backward pass per sample through the batch's graph (kept for the pass that follows).

    Exact, unlike a finite difference of the losses (which float32 rounding limits to about
    1e-3 on these weights), and cheaper too: n backward passes give every recurrent matrix at
    every bit width, where a five-point difference needs 4 forward passes per matrix and width.
    """
    if not names:
        return {}
    params = [weights[name] for name in names]
    # Copies: the stacks share one buffer (``LayerErrors``), and these are used all at once.
    flat = {name: dws[name].reshape(dws[name].shape[0], -1).float().clone() for name in names}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is None:
                rows[name].append(torch.zeros(flat[name].shape[0], device=flat[name].device))
            else:
                rows[name].append(flat[name] @ g.reshape(-1).float())
    return {name: torch.stack(r) for name, r in rows.items()}


def _score_backward(scorer: _BatchScorer, total: torch.Tensor, params: list[torch.Tensor]) -> None:
    """One backward pass of ``total``. Each record's output gradient is scored as it arrives
    (and then dropped); the gradients at shared flows' consumer outputs are kept, by id of the
    consumer step, and scored after the pass. Padding rows (fixed-batch exports) carry no loss,
    so their gradients are zero."""
    flow_deltas: dict[int, torch.Tensor] = {}
    handles = []

    def score(k: int) -> Any:
        def grab(grad_outputs: Any) -> None:
            scorer.score(k, grad_outputs[0])

        return grab

    def keep(key: int) -> Any:
        def grab(grad_outputs: Any) -> None:
            flow_deltas[key] = grad_outputs[0]

        return grab

    hooked: set[int] = set()
    for k, rec in enumerate(scorer.records):
        if rec.node is not None and rec.flow is None:
            handles.append(rec.node.register_prehook(score(k)))
        if rec.flow is not None and rec.flow.failed is None:
            for step in rec.flow.consumers:
                if step.node is not None and id(step) not in hooked:
                    hooked.add(id(step))
                    handles.append(step.node.register_prehook(keep(id(step))))
    try:
        torch.autograd.grad(total, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    scorer.score_shared(flow_deltas)


def _shared_directional(
    rec: OpRecord, dws: torch.Tensor, flow_deltas: dict[int, torch.Tensor], n: int
) -> torch.Tensor | None:
    """``<g_n, dW_b>`` ``(n, B)`` of a use whose output the batch shares, through its flow
    (None when the flow failed, is a kind that cannot be replayed, or never reached the loss)."""
    flow = rec.flow
    assert flow is not None
    if flow.failed is None and rec.kind not in ("linear", "embedding"):
        flow.fail(f"a shared {rec.kind} output is not followed")
    if flow.failed is not None:
        return None
    cols = []
    with torch.no_grad():
        for b in range(dws.shape[0]):
            dw = dws[b].to(rec.out.dtype)
            if rec.transposed:
                dw = dw.T
            if rec.kind == "embedding":
                change = F.embedding(rec.x, dw)
            else:
                change = (rows_of(rec).to(dw.dtype) @ dw.T).reshape(rec.out.shape)
            col = per_sample_directional_shared(flow, change.reshape(rec.out.shape), flow_deltas, n)
            if col is None:
                return None
            cols.append(col)
    return torch.stack(cols, dim=1)


def _finite_difference(
    model: LoadedModel,
    batch: Any,
    per_sample: PerSampleLoss,
    targets: torch.Tensor,
    output_key: Any,
    names: list[str],
    weights: dict[str, torch.Tensor],
    dws: LayerErrors,
    index: dict[str, int],
    sums: torch.Tensor,
    linear_sums: torch.Tensor,
) -> None:
    """``<g_n, dW>`` by central differences of the per-sample losses, for the layers no exact
    path reaches."""
    with capture_context(grad=False):
        for name in names:
            w = weights[name]
            original = w.detach().clone()
            try:
                for j in range(dws[name].shape[0]):
                    dw_norm = float(dws[name][j].norm())
                    if dw_norm == 0.0:
                        continue
                    h = _FD_RELATIVE_STEP * float(original.norm()) / dw_norm
                    vals = {}
                    for step in (2.0, 1.0, -1.0, -2.0):
                        with torch.no_grad():
                            w.copy_(original + step * h * dws[name][j])
                        out = select_output(model(*batch.inputs), output_key)
                        vals[step] = per_sample(out, targets).double()
                    # Five-point stencil: O(h^4) truncation lets h be large enough that
                    # float32 rounding in the loss does not dominate.
                    d = (8 * (vals[1.0] - vals[-1.0]) - (vals[2.0] - vals[-2.0])) / (12 * h)
                    sums[index[name], j] += (d[: batch.valid] ** 2).sum().cpu()
                    linear_sums[index[name], j] += d[: batch.valid].sum().cpu()
            finally:
                with torch.no_grad():
                    w.copy_(original)
