"""Quantization-aware fine-tuning of the uploaded model itself (TorchScript or torch.export).

The model's code is never changed. Each quantized layer gets a float *master* copy of its
weight; before every step the parameter is overwritten with the master's fake-quantized value
(at the layer's bits, with the scales fixed when the allocation was quantized), the model runs
forward and backward as usual, and the parameter's gradient is handed to the master
(straight-through estimator, zeroed where the master lies outside the clipping range).
Biases, norms and other float parameters train directly. Modules stay in eval mode, so
BatchNorm statistics stay as the model has them and dropout is off.

The default loss distils the float model (KL on class scores, mean squared error on other
outputs), plus cross entropy when labels are given. A held-out part of the data picks the best
epoch; the state before fine-tuning counts as epoch 0, so fine-tuning never makes the held-out
loss worse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.evaluate import is_class_scores
from mpq_core.intake import LoadedModel, select_output
from mpq_core.progress import ProgressFn, counted, null_progress
from mpq_core.quant_primitives import FLOAT_BITS, fake_quantize_on, output_major, ste_mask
from mpq_core.runner import Batch, iter_batches
from mpq_core.spec import FinetuneSpec
from mpq_core.weight_sets import WeightSet, copy_weights, swapped_in

__all__ = ["FinetuneResult", "finetune", "split_holdout"]


@dataclass
class FinetuneResult:
    epochs_run: int
    best_epoch: int
    val_loss_before: float
    val_loss_after: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_holdout(
    data: CalibrationData, fraction: float, seed: int
) -> tuple[CalibrationData, CalibrationData]:
    """A seeded random split into (train, held-out); the held-out part has at least one sample."""
    n = data.num_samples
    held = min(max(1, round(n * fraction)), n - 1) if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[held:]), data.subset(perm[:held])


def _distill(out: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if is_class_scores(out):
        logp, logq = F.log_softmax(teacher.float(), -1), F.log_softmax(out.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    return F.mse_loss(out.float(), teacher.float())


class _Quantized:
    """Master weights and their fake-quantized copies in the model's parameters."""

    def __init__(
        self,
        model: LoadedModel,
        bits: dict[str, int],
        scales: dict[str, torch.Tensor],
        zeros: dict[str, torch.Tensor | None] | None,
        transposed: Collection[str],
    ) -> None:
        weights = model.named_weights()
        self.params = {n: weights[n] for n in bits}
        self.bits = bits
        # Scales live where the weights do (quantize_weights computes them on the CPU).
        self.scales = {n: s.to(weights[n].device) for n, s in scales.items()}
        # The zero points of layers with asymmetric codes (none: all symmetric).
        self.zeros = {
            n: None if z is None else z.to(self.params[n].device)
            for n, z in (zeros or {}).items()
            if n in self.params
        }
        # Layers stored (in, out, ...): their scales follow dim 1 (``quantize_weights``).
        self.transposed = frozenset(transposed)
        self.masters = {n: p.detach().clone().requires_grad_(True) for n, p in self.params.items()}

    @torch.no_grad()
    def load(self) -> None:
        for n, p in self.params.items():
            p.copy_(
                fake_quantize_on(
                    self.masters[n],
                    self.scales[n],
                    self.bits[n],
                    self.zeros.get(n),
                    transposed=n in self.transposed,
                )
            )

    def ste(self) -> None:
        """Hand each parameter's gradient to its master, zeroed where the master lies outside
        the clipping range, and clear the parameter's. The gradient tensor itself moves, so
        the step holds one set of gradients, not two."""
        for n, p in self.params.items():
            g, p.grad = p.grad, None
            master = self.masters[n]
            if g is not None and self.bits[n] != FLOAT_BITS:  # 16 bits: no range, no mask
                t = n in self.transposed
                w = output_major(master.detach(), t)
                inside = ste_mask(w, self.scales[n], self.bits[n], self.zeros.get(n))
                g.masked_fill_(~output_major(inside, t), 0)
            master.grad = g

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().clone() for n, m in self.masters.items()}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        for n, t in snap.items():
            self.masters[n].copy_(t)


class _Session:
    """One fine-tuning run: the data split, the float model's original parameters (the
    teacher), the masters and the float parameters being trained, the optimiser and its
    schedule."""

    def __init__(
        self,
        model: LoadedModel,
        data: CalibrationData,
        quantized: _Quantized,
        cfg: FinetuneSpec,
        seed: int,
        *,
        teacher: WeightSet | None,
        act_quant: Any,
        output_key: Any,
        micro_batch_size: int | None = None,
    ) -> None:
        self.model, self.cfg, self.q, self.output_key = model, cfg, quantized, output_key
        self.train, self.val = split_holdout(data, cfg.val_fraction, seed)
        # The teacher is the float model itself: its original parameters (all of them, since
        # biases and norms train too) are swapped in for each batch, not its outputs cached.
        self.originals: WeightSet = teacher if teacher is not None else copy_weights(model)
        self.others = {n: p for n, p in model.named_weights().items() if n not in quantized.bits}
        self.trainable = list(self.q.params.values()) + list(self.others.values())
        self.requires = [p.requires_grad for p in self.trainable]
        for p in self.trainable:
            p.requires_grad_(True)
            p.grad = None  # gradients accumulate here, from nothing
        # Per-parameter steps: the multi-tensor step (CUDA's default) allocates its
        # temporaries for all parameters at once, another copy of the model; the kernel
        # launches it saves are nothing beside a step of a model large enough to care.
        self.opt = torch.optim.Adam(
            [*self.q.masters.values(), *self.others.values()], lr=cfg.lr, foreach=False
        )
        # A fixed-batch torch.export program runs at its own batch size (iter_batches pads to it).
        steps_per_epoch = math.ceil(self.train.num_samples / (model.fixed_batch or cfg.batch_size))
        total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        self.total = total
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
        self.act = act_quant if act_quant is not None else nullcontext()
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.step = 0
        # Passes run on micro-batches of at most this many samples (a memory budget's choice;
        # a fixed-batch export runs at its own size); each step still sees cfg.batch_size.
        self.micro = (
            cfg.batch_size
            if micro_batch_size is None
            else max(1, min(micro_batch_size, cfg.batch_size))
        )

    def teacher(self, batch: Batch) -> torch.Tensor:
        """The float model's output on ``batch`` (padding dropped, float32): the original
        parameters are swapped in for one forward pass without activation quantization."""
        with swapped_in(self.model, self.originals), capture_context(grad=False):
            out = select_output(self.model(*batch.inputs), self.output_key)
            return out[: batch.valid].detach().float()

    def loss_on(self, batch: Batch, label_weight: float) -> torch.Tensor:
        """The training loss on ``batch`` against the float model, plus ``label_weight``
        times the cross entropy where there are labels."""
        teacher, valid, labels = self.teacher(batch), batch.valid, batch.labels
        with self.act:
            out = select_output(self.model(*batch.inputs), self.output_key)[:valid]
        loss = self.cfg.distill_weight * _distill(out, teacher)
        if labels is not None and is_class_scores(out) and label_weight:
            loss = loss + label_weight * F.cross_entropy(
                out.float().reshape(-1, out.shape[-1]), labels[:valid].reshape(-1)
            )
        return loss

    def val_loss(self) -> float:
        self.q.load()
        total_loss, count = 0.0, 0
        with capture_context(grad=False):
            for batch in iter_batches(self.model, self.val, self.micro):
                # Epochs are chosen on fidelity to the float model alone: cross entropy on a
                # small held-out set mostly measures the float model's own mistakes.
                # A float at once: the loss's graph (capture_context keeps autograd on) would
                # otherwise hold this batch's activations while the next batch runs.
                loss = float(self.loss_on(batch, label_weight=0.0).detach())
                total_loss += loss * batch.valid
                count += batch.valid
        return total_loss / max(count, 1)

    def train_epoch(self, epoch: int, report: ProgressFn) -> float:
        """One pass over the shuffled training data (or what is left of ``total`` steps);
        the mean training loss."""
        perm = torch.randperm(self.train.num_samples, generator=self.gen)
        shuffled = self.train.subset(perm)
        running, seen = 0.0, 0
        with capture_context(grad=True):
            for batch in iter_batches(self.model, shuffled, self.cfg.batch_size):
                if self.step >= self.total:
                    break
                self.q.load()
                loss = self._accumulated(batch)
                self._update()
                self.step += 1
                running += loss * batch.valid
                seen += batch.valid
                report(
                    "finetune",
                    self.step / self.total,
                    counted(
                        self.step, self.total, "steps", epoch=epoch, loss=running / max(seen, 1)
                    ),
                )
        return running / max(seen, 1)

    def _accumulated(self, batch: Batch) -> float:
        """The batch's loss, its gradients summed into the parameters' ``.grad`` over
        micro-batches of ``self.micro`` samples, each weighted by its share of the batch: the
        step a whole batch would take, within the memory of a micro-batch."""
        value = 0.0
        for part in _micro_batches(batch, self.micro):
            loss = self.loss_on(part, self.cfg.label_weight) * (part.valid / batch.valid)
            if loss.requires_grad:  # a loss no trained parameter reaches has no gradient
                loss.backward()  # frees this micro-batch's graph before the next is built
            value += float(loss.detach())
        return value

    def _update(self) -> None:
        self.q.ste()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def initial_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The state before fine-tuning, which the teacher's weights hold: no copy."""
        return (
            {n: self.originals[n] for n in self.q.params},
            {n: self.originals[n] for n in self.others},
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.q.snapshot(), {n: p.detach().clone() for n, p in self.others.items()}

    def finish(self, best: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None) -> None:
        """Leave the model at the ``best`` state (None: the current one), its parameters'
        gradients cleared and their requires_grad as it was."""
        if best is not None:
            self.q.restore(best[0])
            with torch.no_grad():
                for n, p in self.others.items():
                    p.copy_(best[1][n])
        self.q.load()
        for p, r in zip(self.trainable, self.requires, strict=True):
            p.grad = None
            p.requires_grad_(r)


def _micro_batches(batch: Batch, size: int) -> list[Batch]:
    """``batch`` cut into parts of at most ``size`` real samples (the batch itself when it is
    no larger, or when it carries padding for a fixed-batch export)."""
    if batch.valid <= size or batch.inputs[0].shape[0] != batch.valid:
        return [batch]
    return [
        Batch(
            inputs=[t[s : s + size] for t in batch.inputs],
            labels=None if batch.labels is None else batch.labels[s : s + size],
            valid=min(size, batch.valid - s),
            start=batch.start + s,
        )
        for s in range(0, batch.valid, size)
    ]


def finetune(
    model: LoadedModel,
    data: CalibrationData,
    bits: dict[str, int],
    scales: dict[str, torch.Tensor],
    settings: FinetuneSpec | None = None,
    *,
    seed: int = 0,
    act_quant: Any = None,
    output_key: Any = None,
    progress: ProgressFn | None = None,
    zeros: dict[str, torch.Tensor | None] | None = None,
    micro_batch_size: int | None = None,
    transposed: Collection[str] = (),
    teacher: WeightSet | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place with its quantized layers held at ``bits`` / ``scales``.

    On return the model's quantized parameters hold the dequantized weights of the best epoch
    and its float parameters the matching values.

    Args:
        model: the loaded model, with its float weights.
        data: the fine-tuning data; ``settings.val_fraction`` of it is held out.
        bits: bit width of each quantized layer, by parameter name.
        scales: scales of each quantized layer, per channel or per group (kept fixed).
        settings: the job spec's ``finetune`` part; defaults to ``FinetuneSpec()``.
        seed: data order and hold-out split.
        act_quant: an ``ActivationQuantizer`` to apply in every forward pass.
        output_key: which element of a tuple/dict output to train on.
        progress: called as ``progress("finetune", fraction, metrics)``.
        zeros: zero points of the layers with asymmetric codes (kept fixed).
        micro_batch_size: run each step's batch in parts of at most this many samples,
            accumulating the gradients (same steps and result, less memory); default: whole.
        transposed: the layers stored ``(in, out, ...)``, whose scales follow dim 1 (as
            ``quantize_weights`` was told).
        teacher: the float model's values of all its parameters (``copy_weights``), which
            the model holds on entry; copied from the model when None. Read only: a caller
            that has them anyway saves a copy of the model.
    """
    cfg = settings or FinetuneSpec()
    start = time.perf_counter()
    quantized = _Quantized(model, bits, scales, zeros, transposed)
    run = _Session(
        model,
        data,
        quantized,
        cfg,
        seed,
        teacher=teacher,
        act_quant=act_quant,
        output_key=output_key,
        micro_batch_size=micro_batch_size,
    )
    return _fit(run, progress or null_progress, start)


def _fit(run: _Session, report: ProgressFn, start: float) -> FinetuneResult:
    """Train ``run`` epoch by epoch until its steps are done or its patience runs out, and
    leave the model at the epoch with the lowest held-out loss (epoch 0 included)."""
    cfg = run.cfg
    best = before = run.val_loss()
    # The best state is copied only when training would change it: the state before
    # fine-tuning is the teacher's (no copy), and after the last epoch None keeps the current.
    best_epoch = 0
    kept: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = run.initial_state()
    history: list[dict[str, float]] = [{"epoch": 0, "val_loss": best}]
    epoch, stale = 0, 0
    try:
        while run.step < run.total:
            if kept is None:  # the best state is the current one, which training will change
                kept = run.state()
            epoch += 1
            train_loss = run.train_epoch(epoch, report)
            current = run.val_loss()
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": current})
            if current < best:
                best, best_epoch, stale, kept = current, epoch, 0, None
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    finally:
        run.finish(kept)
    report("finetune", 1.0, {"best_epoch": best_epoch, "val_loss": best})
    return FinetuneResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        val_loss_before=before,
        val_loss_after=best,
        seconds=time.perf_counter() - start,
        history=history,
    )
