"""Seeing the layers of a compiled model from the inside.

TorchScript modules refuse forward hooks and torch.export modules have no submodules to hook,
but both run their ops through the dispatcher. ``LayerCapture`` is a TorchDispatchMode that
recognises every op consuming a quantizable weight (matched to the parameter by ``data_ptr``
and shape) and records the op's input activation, its output and its configuration. The
autograd node that produced each output is kept too, so a backward pass can deliver the
gradient with respect to that exact output, even if the model later modifies it in place
(``relu_``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpq_core.shared_flow import FlowStep, SharedFlow, follow

__all__ = [
    "LayerCapture",
    "OpRecord",
    "WeightRef",
    "WeightUse",
    "capture_context",
    "shape_only",
    "weight_use",
]

aten = torch.ops.aten

_CONV_OPS = {aten.convolution.default, aten._convolution.default}
_MKLDNN_RNN = getattr(aten, "mkldnn_rnn_layer", None)
_MKLDNN_RNN = _MKLDNN_RNN.default if _MKLDNN_RNN is not None else None
_RNN_OPS = {
    aten.lstm.input: "lstm",
    aten.gru.input: "gru",
    aten.rnn_tanh.input: "rnn_tanh",
    aten.rnn_relu.input: "rnn_relu",
}


@contextmanager
def capture_context(grad: bool = True) -> Iterator[None]:
    """Run a model so that every op is visible.

    TorchScript's optimising executor would fuse ops into differentiable subgraphs after a few
    calls, and nn.MultiheadAttention (eager or scripted) takes a fused fast path whenever
    gradients are off; both hide layers from the capture and from activation quantization.
    So gradients stay enabled even for ``grad=False`` (callers that need none detach what they
    keep, and each batch's graph is freed with its outputs); ``grad`` only documents intent.
    """
    del grad
    with torch.jit.optimized_execution(False), torch.enable_grad():
        yield


@dataclass(frozen=True)
class WeightUse:
    """Where a dispatched op consumes a weight: the weight as passed (a linear sees it
    transposed), the shape the parameter itself must have, and the position of the activation.

    A matrix product takes ``x @ mat2``: ``mat2`` is usually the transpose of an ``(out, in)``
    parameter (``nn.Linear``), but GPT-2's ``Conv1D`` stores its weight ``(in, out)`` and passes
    it as it is (``transposed_param``). The strides tell the two apart even for square weights.
    """

    weight: torch.Tensor
    shape: tuple[int, ...]
    x_index: int
    op: str  # conv | mm | linear | embedding

    def matches(self, param: torch.Tensor) -> bool | None:
        """None if ``param`` is not this op's weight; else whether it is stored transposed
        (``(in, out)``, used as is by a matrix product)."""
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.device.type == "meta":
            return None
        if w.data_ptr() != param.data_ptr():
            return None
        if self.op != "mm":
            return False if tuple(param.shape) == self.shape else None
        if tuple(param.shape) == self.shape and (
            w.stride() == tuple(reversed(param.stride())) or w.shape[0] != w.shape[1]
        ):
            return False
        if tuple(param.shape) == tuple(w.shape) and w.stride() == param.stride():
            return True
        return None


def weight_use(func: Any, args: tuple[Any, ...]) -> WeightUse | None:
    """The weight operand of a convolution, matrix product, linear or embedding op, if any.

    Matching it to a parameter (by storage and ``shape``) is the caller's business.
    """
    if func in _CONV_OPS:
        return WeightUse(args[1], tuple(args[1].shape), 0, "conv")
    if func is aten.addmm.default or func is aten.mm.default:
        x_index = 1 if func is aten.addmm.default else 0
        mat2 = args[x_index + 1]
        if not isinstance(mat2, torch.Tensor) or mat2.dim() != 2:
            return None
        return WeightUse(mat2, (mat2.shape[1], mat2.shape[0]), x_index, "mm")
    if func is aten.linear.default:
        return WeightUse(args[1], tuple(args[1].shape), 0, "linear")
    if func is aten.embedding.default:
        return WeightUse(args[0], tuple(args[0].shape), 1, "embedding")
    return None


@dataclass(frozen=True)
class WeightRef:
    """A candidate weight: its name and the tensor it must be matched against."""

    name: str
    tensor: torch.Tensor


@dataclass
class OpRecord:
    """One use of a quantizable weight in a forward pass.

    ``x`` is the activation the op multiplied the weight with (for conv, the input feature
    map; for linear, the 2-D or N-D input; for embedding, the indices). ``out`` is the op's
    output; ``node`` the autograd node that made it (None without grad).
    """

    name: str
    kind: str
    op: str
    x: torch.Tensor
    out: torch.Tensor
    conv: dict[str, Any] = field(default_factory=dict)
    node: Any = None
    seq_len: int = 0
    flow: SharedFlow | None = None  # a use whose output every sample shares (shared_flow.py)
    transposed: bool = False  # the parameter is stored (in, out) and used as is (GPT-2 Conv1D)


def shape_only(t: torch.Tensor) -> torch.Tensor:
    """A stand-in for a tensor no longer needed: its shape and dtype on the meta device, no
    data (what a record's shape-based bookkeeping still reads once the data is released)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _conv_kind(weight: torch.Tensor, transposed: bool) -> str:
    dims = weight.dim() - 2
    return ("conv_transpose" if transposed else "conv") + f"{dims}d"


class LayerCapture(TorchDispatchMode):
    """Record every op that consumes one of ``weights``.

    Args:
        weights: the candidate weights (matrices and conv kernels).
        keep: keep activations and outputs (needed for sensitivities; profiling only needs
            shapes and can drop them to save memory).
        on_record: called with each record as it is made.
        shared: per layer name, the uses (0 for its first op in the forward pass, ...) whose
            output is shared by the whole batch; their flow to the batch is followed.
        batch: samples in the batch (flows are only followed for more than one).
        release_outputs: once an op's autograd node is known, keep only the shape and dtype of
            its output (a meta tensor), unless a shared flow starts there: the Fisher pass
            reaches outputs through their nodes, and holding the tensors would keep outputs
            alive that autograd itself frees (a batch of every layer's outputs).
    """

    def __init__(
        self,
        weights: list[WeightRef],
        *,
        keep: bool = True,
        on_record: Callable[[OpRecord], None] | None = None,
        shared: dict[str, set[int]] | None = None,
        batch: int = 0,
        release_outputs: bool = False,
    ) -> None:
        super().__init__()
        self._release_outputs = release_outputs
        self._by_ptr: dict[int, list[WeightRef]] = {}
        for ref in weights:
            self._by_ptr.setdefault(ref.tensor.data_ptr(), []).append(ref)
        self.records: list[OpRecord] = []
        self._pending: list[OpRecord] = []
        self._keep = keep
        self._on_record = on_record
        self._shared = shared or {}
        self._batch = batch
        self._uses: dict[str, int] = defaultdict(int)
        self._flows: dict[int, tuple[list[SharedFlow], torch.Tensor]] = {}
        self._pending_steps: list[FlowStep] = []

    def _match(self, t: Any, shape: tuple[int, ...]) -> WeightRef | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        for ref in self._by_ptr.get(t.data_ptr(), ()):
            if tuple(ref.tensor.shape) == shape:
                return ref
        return None

    def _match_use(self, use: WeightUse) -> tuple[WeightRef, bool] | None:
        if not isinstance(use.weight, torch.Tensor) or use.weight.device.type == "meta":
            return None
        for ref in self._by_ptr.get(use.weight.data_ptr(), ()):
            transposed = use.matches(ref.tensor)
            if transposed is not None:
                return ref, transposed
        return None

    def _resolve_pending(self) -> None:
        # Autograd attaches grad_fn only after our __torch_dispatch__ returns, so the node
        # is read at the next dispatched op (or at finish()), before any in-place op on it runs.
        for rec in self._pending:
            rec.node = rec.out.grad_fn
            if self._release_outputs and rec.flow is None:
                rec.out = shape_only(rec.out)
        self._pending.clear()
        for step in self._pending_steps:
            step.node = step.out.grad_fn
        self._pending_steps.clear()

    def finish(self) -> None:
        """Resolve the autograd nodes of the last ops; call after the forward returns."""
        self._resolve_pending()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self._pending or self._pending_steps:
            self._resolve_pending()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self._recognise(func, args, out)
        if self._flows:
            step = follow(self._flows, func, args, kwargs, out, self._batch)
            if step is not None:
                self._pending_steps.append(step)
        if rec is not None:
            use = self._uses[rec.name]
            self._uses[rec.name] += 1
            if self._batch > 1 and use in self._shared.get(rec.name, ()):
                rec.flow = SharedFlow(out)
                self._flows[id(out)] = ([rec.flow], out)
            if self._keep:
                self._pending.append(rec)
            self.records.append(rec)
            if self._on_record is not None:
                self._on_record(rec)
        return out

    def _rnn_records(
        self, op: str, inp: torch.Tensor, params: list[Any], batch_first: bool, out: torch.Tensor
    ) -> None:
        # Recurrent weights get one record each; their sensitivities come from finite
        # differences (see fisher.py), so no activation or autograd node is kept.
        seq_len = int(inp.shape[1] if batch_first else inp.shape[0]) if inp.dim() == 3 else 1
        for p in params:
            if not isinstance(p, torch.Tensor) or p.dim() != 2:
                continue
            ref = self._match(p, tuple(p.shape))
            if ref is None:
                continue
            rec = OpRecord(ref.name, "rnn", op, inp.detach(), out.detach(), seq_len=seq_len)
            self.records.append(rec)
            if self._on_record is not None:
                self._on_record(rec)
        return None

    def _recognise(self, func: Any, args: tuple[Any, ...], out: Any) -> OpRecord | None:
        use = weight_use(func, args)
        if use is not None:
            found = self._match_use(use)
            if found is None:
                return None
            ref, transposed = found
            x = args[use.x_index]
            if use.op != "conv":
                kind = "embedding" if use.op == "embedding" else "linear"
                return OpRecord(ref.name, kind, use.op, x, out, transposed=transposed)
            transposed = bool(args[6])
            conv = {
                "stride": list(args[3]),
                "padding": list(args[4]),
                "dilation": list(args[5]),
                "transposed": transposed,
                "output_padding": list(args[7]),
                "groups": int(args[8]),
            }
            return OpRecord(ref.name, _conv_kind(use.weight, transposed), "conv", x, out, conv)
        if func in _RNN_OPS:
            # aten::lstm etc. taking the flat weight list (the non-mkldnn, non-cudnn path).
            inp, params, batch_first = args[0], args[2], bool(args[-1])
            self._rnn_records(func.__name__, inp, list(params), batch_first, out[0])
            return None
        if func is _MKLDNN_RNN:
            # CPU LSTM/GRU run one layer per call: (input, w_ih, w_hh, b_ih, b_hh, hx, cx, ...).
            self._rnn_records(
                "mkldnn_rnn_layer", args[0], [args[1], args[2]], bool(args[14]), out[0]
            )
            return None
        return None
