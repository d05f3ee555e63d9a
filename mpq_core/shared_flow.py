"""Layers whose output is shared by every sample of a batch, and how to score them per sample.

A position table looked up with a ``(1, T)`` index tensor (BERT, GPT-2, RoBERTa, CLIP; T5's
relative attention bias) yields one output for the whole batch, which a later op broadcasts
against the batch (``embeddings + positions``). Autograd sums the samples' gradients at that
broadcast, so the gradient at the layer's own output no longer tells the samples apart, and
its rows are not "k rows per sample".

Per sample, the directional derivative the Fisher needs is still cheap to get exactly. The
capture follows the shared output through the batch-free ops that use it (views, casts, scales:
the *steps*) to each op that broadcasts it against the batch (a *consumer*), keeping each op's
arguments. The gradient at a consumer's output is per sample. For a weight perturbation ``dW``
the layer's output moves by ``dE = f(x; dW)``; forward-mode differentiation
(``torch.func.jvp``) carries ``dE`` through the steps and the consumer, and the product with
the consumer's output gradient, summed over everything but the batch dimension, is
``<g_n, dW>`` for every sample ``n`` at once.

What cannot be followed (an op with several outputs, an in-place change of the shared tensor,
no batch dimension found at the consumer, a chain too long) marks the flow ``failed`` with a
reason; the Fisher then scores that layer by finite differences instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["FlowStep", "SharedFlow", "follow", "per_sample_directional_shared"]

# A shared output reaches the batch within a few ops in every architecture seen; a longer
# batch-free chain means the tracking went astray (e.g. it followed the whole network).
MAX_STEPS = 64


@dataclass
class FlowStep:
    """One op on the way from a shared output to the batch: the op, its arguments as called,
    its output, and which flattened argument positions held followed tensors."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: torch.Tensor
    followed: list[int]
    node: Any = None  # consumers: the autograd node of ``out`` (its gradient is per sample)
    batch_dim: int = 0


@dataclass
class SharedFlow:
    """Where one use of a shared layer's output goes: the steps that keep it batch-free, keyed
    by the id of the tensor they produce, and the consumers that broadcast it over the batch."""

    source: torch.Tensor
    producers: dict[int, FlowStep] = field(default_factory=dict)
    consumers: list[FlowStep] = field(default_factory=list)
    failed: str | None = None

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why


def _leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    return tree_flatten((args, kwargs))[0]


def _touches(flows: dict[int, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether an argument (or an element of a list argument) is a followed tensor."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if id(value) in flows:
                return True
        elif isinstance(value, list | tuple) and any(
            isinstance(v, torch.Tensor) and id(v) in flows for v in value
        ):
            return True
    return False


def follow(
    flows: dict[int, tuple[list[SharedFlow], torch.Tensor]],
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
    batch: int,
) -> FlowStep | None:
    """Extend the flows ``func`` continues (``flows`` maps id(tensor) to the flows that reach it
    and the tensor itself, kept alive so the id stays its own). Returns the step when it is a
    consumer, whose autograd node the caller must resolve after the op returns."""
    # The fast path (most ops touch no followed tensor); checks like torch.export's
    # aten._assert_tensor_metadata return nothing and change nothing.
    if out is None or not _touches(flows, args, kwargs):
        return None
    leaves = _leaves(args, kwargs)
    followed = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, torch.Tensor) and id(leaf) in flows and flows[id(leaf)][1] is leaf
    ]
    if not followed:
        return None
    reached: list[SharedFlow] = []
    for i in followed:
        for flow in flows[id(leaves[i])][0]:
            if all(flow is not r for r in reached):
                reached.append(flow)
    if not isinstance(out, torch.Tensor):
        for flow in reached:
            flow.fail(f"{func} returns several tensors")
        return None
    if any(leaves[i] is out for i in followed):
        for flow in reached:
            flow.fail(f"{func} changes the shared tensor in place")
        return None
    step = FlowStep(func, args, kwargs, out, followed)
    widest = max(leaves[i].numel() for i in followed)
    if out.numel() > widest and batch > 1:
        step.batch_dim = _batch_dim(out, [leaves[i] for i in followed], batch)
        for flow in reached:
            if step.batch_dim < 0:
                flow.fail(f"{func} broadcasts the shared tensor but over no batch dimension")
            else:
                flow.consumers.append(step)
        return step if step.batch_dim >= 0 else None
    for flow in reached:
        if len(flow.producers) >= MAX_STEPS:
            flow.fail(f"more than {MAX_STEPS} ops before the shared tensor meets the batch")
        flow.producers[id(out)] = step
    flows[id(out)] = (reached, out)
    return None


def _batch_dim(out: torch.Tensor, inputs: list[torch.Tensor], batch: int) -> int:
    """The dimension of ``out`` of size ``batch`` along which the shared input was broadcast
    (size 1 there, or absent), or -1."""
    shape = inputs[0].shape
    padded = (1,) * (out.dim() - len(shape)) + tuple(shape)
    for d, size in enumerate(out.shape):
        if size == batch and d < len(padded) and padded[d] == 1:
            return d
    return -1


def _out_of_place(func: Any) -> Any:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor``: replay must not write into recorded tensors."""
    packet = func.overloadpacket
    name = packet.__name__
    if not name.endswith("_") or name.endswith("__"):
        return func
    plain = getattr(torch.ops.aten, name[:-1], None)
    return getattr(plain, func._overloadname, func) if plain is not None else func


def _jvp(step: FlowStep, tangent_of: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """The change of ``step.out`` when each followed argument moves by its tangent."""
    leaves, spec = tree_flatten((step.args, step.kwargs))
    moving = [i for i in step.followed if tangent_of(leaves[i]) is not None]
    func = _out_of_place(step.func)

    def call(*values: torch.Tensor) -> torch.Tensor:
        filled = list(leaves)
        for i, v in zip(moving, values, strict=True):
            filled[i] = v
        a, k = tree_unflatten(filled, spec)
        result: torch.Tensor = func(*a, **k)
        return result

    primals = tuple(leaves[i] for i in moving)
    tangents = tuple(tangent_of(leaves[i]) for i in moving)
    return torch.func.jvp(call, primals, tangents)[1]


def per_sample_directional_shared(
    flow: SharedFlow, d_source: torch.Tensor, deltas: dict[int, torch.Tensor], batch: int
) -> torch.Tensor | None:
    """``<g_n, dW>`` for every sample from the change ``d_source`` of the shared output:
    ``(batch,)``, or None when no consumer's gradient reached the loss.

    ``deltas`` maps id(consumer step) to the gradient at that consumer's output.
    """
    memo: dict[int, torch.Tensor | None] = {id(flow.source): d_source}

    def tangent_of(t: torch.Tensor) -> torch.Tensor | None:
        key = id(t)
        if key not in memo:
            step = flow.producers.get(key)
            memo[key] = None if step is None or step.out is not t else _jvp(step, tangent_of)
        return memo[key]

    total: torch.Tensor | None = None
    for step in flow.consumers:
        grad = deltas.get(id(step))
        if grad is None:
            continue
        change = _jvp(step, tangent_of).float() * grad.float()
        per = change.movedim(step.batch_dim, 0).reshape(batch, -1).sum(1)
        total = per if total is None else total + per
    return total
