"""Layer profiling: find every quantizable weight and measure its MACs on a real forward pass."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from mpq_core.capture import LayerCapture, OpRecord, WeightRef, capture_context
from mpq_core.data import CalibrationData
from mpq_core.errors import ModelFormatError
from mpq_core.intake import LoadedModel
from mpq_core.layers import LayerInfo
from mpq_core.packed_checkpoint import float_storage_dtype
from mpq_core.runner import MODEL_ERRORS, error_summary, iter_batches

__all__ = ["ModelProfile", "candidate_weights", "profile_model", "rows_of"]


@dataclass
class ModelProfile:
    """The quantizable layers of a model, in the order the forward pass uses them."""

    layers: list[LayerInfo]
    float_params: int
    total_params: int
    #: Matrices and kernels (2-D or more) left in float, with why; vectors (biases, norms) are
    #: always float and not listed.
    left_in_float: dict[str, str] = field(default_factory=dict)
    #: The model's size in its own dtype(s): the baseline of compression ratios.
    model_bytes: int = 0
    #: What the parameters left in float take in the packed checkpoint.
    float_bytes: int = 0

    @property
    def quantized_params(self) -> int:
        return sum(layer.params for layer in self.layers)


def candidate_weights(model: LoadedModel) -> list[WeightRef]:
    """Parameters that could be quantizable (matrices and conv kernels)."""
    return [WeightRef(n, p) for n, p in model.named_weights().items() if p.dim() >= 2]


def rows_of(rec: OpRecord) -> torch.Tensor:
    """The activation as rows, one per (sample, position) the weight is applied at."""
    if rec.kind == "linear":
        return rec.x.reshape(-1, rec.x.shape[-1])
    if rec.kind == "embedding":
        return rec.x.reshape(-1, 1)
    return rec.x.reshape(rec.x.shape[0], -1)


def _macs(rec: OpRecord, weight_shape: tuple[int, ...]) -> int:
    if rec.kind.startswith("conv_transpose"):
        # Each input element is multiplied with a (Cout/groups * kernel) slice of the weight.
        per_in = 1
        for s in weight_shape[1:]:
            per_in *= s
        return rec.x.numel() * per_in
    if rec.kind.startswith("conv"):
        per_out = 1
        for s in weight_shape[1:]:
            per_out *= s
        return rec.out.numel() * per_out
    if rec.kind == "linear":
        fan_in = weight_shape[0] if rec.transposed else weight_shape[1]
        return (rec.x.numel() // fan_in) * weight_shape[0] * weight_shape[1]
    if rec.kind == "rnn":
        batch = rec.x.numel() // max(rec.seq_len, 1) // max(rec.x.shape[-1], 1)
        return weight_shape[0] * weight_shape[1] * rec.seq_len * batch
    return 0  # embedding: a lookup, no multiplies


def _probe_layout(model: LoadedModel, data: CalibrationData, refs: list[WeightRef]) -> list[str]:
    """Which rows of each linear/embedding activation belong to which sample.

    Layers that transpose to sequence-first internally (nn.MultiheadAttention) hand their
    projections rows ordered (position, sample) instead of (sample, position). Two forward
    passes whose batches share only sample 0 tell them apart: the rows that agree between the
    passes are sample 0's, either the first block ("blocked") or every N-th ("interleaved").
    """
    size = model.fixed_batch or 2
    if data.num_samples < 3 or size < 2:
        return []

    def batch_with(other: int) -> list[torch.Tensor]:
        idx = torch.tensor([0] + [other] * (size - 1))
        return [t[idx] for t in data.inputs]

    runs = []
    for other in (1, 2):
        cap = LayerCapture(refs, keep=False)
        with capture_context(), cap:
            model(*batch_with(other))
        runs.append(cap.records)
    layouts = []
    for ra, rb in zip(*runs, strict=True):
        if ra.kind not in ("linear", "embedding"):
            layouts.append("blocked")
            continue
        xa, xb = rows_of(ra).float(), rows_of(rb).float()
        if xa.shape != xb.shape or xa.shape[0] % size:
            layouts.append("blocked")
            continue
        same = torch.isclose(xa, xb, rtol=1e-4, atol=1e-5).all(dim=1)
        per = xa.shape[0] // size
        if per == 1 or bool(same[:per].all()):
            layouts.append("blocked")
        elif bool(same[0::size].all()):
            layouts.append("interleaved")
        else:
            warnings.warn(
                f"cannot tell which rows of {ra.name}'s input belong to which sample; "
                "assuming sample-major order",
                stacklevel=2,
            )
            layouts.append("blocked")
    return layouts


# torch names recurrent matrices weight_ih_l<k>[_reverse] / weight_hh_l<k>[_reverse]. A GRU (and
# an LSTM on some backends) runs as plain matrix products, which only the name tells apart.
_RNN_WEIGHT = re.compile(r"(^|\.)weight_(ih|hh)_l\d+(_reverse)?$")


_UNUSED_MATRIX = (
    "no convolution, matrix product, embedding lookup or recurrent op multiplies it as it is "
    "(it is added or scaled, like a class token or a position table, or a weight is computed "
    "from it in every forward, like weight norm's g and v)"
)


def _kind(rec: OpRecord) -> str:
    """The layer kind to report: a recurrent matrix is ``rnn`` however its op ran."""
    if rec.kind == "linear" and _RNN_WEIGHT.search(rec.name):
        return "rnn"
    return rec.kind


def _records(
    model: LoadedModel, refs: list[WeightRef], inputs: list[torch.Tensor]
) -> list[OpRecord]:
    cap = LayerCapture(refs, keep=False)
    with capture_context(), cap:
        model(*inputs)
    return cap.records


def _probe_shared(
    model: LoadedModel, data: CalibrationData, refs: list[WeightRef], records: list[OpRecord]
) -> list[bool]:
    """Which uses of linear/embedding weights produce one output for the whole batch (a position
    table looked up with ``(1, T)`` indices): their rows do not grow with the batch.

    A dynamic-batch model runs sample 0 repeated twice and three times (never alone: models
    special-case a batch of 1, and BatchNorm traced in training mode refuses it); a fixed-batch
    program cannot, so there a use is shared when its rows do not divide among the samples or
    its input has a leading dimension of 1 (``records`` are from one run at the fixed batch).
    A model that fails on the probes, or runs other layers for them, is scored as per-sample,
    with a warning.
    """
    fixed = model.fixed_batch
    if fixed is not None:
        return [
            rec.kind in ("linear", "embedding")
            and fixed > 1
            and (rows_of(rec).shape[0] % fixed != 0 or (rec.x.dim() >= 2 and rec.x.shape[0] == 1))
            for rec in records
        ]
    try:
        two, three = (
            _records(model, refs, [t[:1].repeat(k, *([1] * (t.dim() - 1))) for t in data.inputs])
            for k in (2, 3)
        )
    except MODEL_ERRORS as exc:
        why = f"it fails on them ({error_summary(exc, 200)})"
    else:
        if len(two) == len(three):
            return [
                a.kind in ("linear", "embedding") and rows_of(a).shape[0] == rows_of(b).shape[0]
                for a, b in zip(two, three, strict=True)
            ]
        why = "it runs other layers for them"
    warnings.warn(
        f"probing the model with batches of 2 and 3 copies of one sample, {why}: layers shared "
        "by the whole batch (position tables) cannot be detected and are scored as per-sample",
        stacklevel=3,
    )
    return [False] * len(records)


def _what_stays_float(model: LoadedModel, quantized: set[str]) -> tuple[dict[str, str], int, int]:
    """The matrices left in float (with why), the model's size in its own dtypes, and what the
    parameters left in float take in the packed checkpoint."""
    weights = model.named_weights()
    left = {
        name: _UNUSED_MATRIX
        for name, p in weights.items()
        if p.dim() >= 2 and name not in quantized
    }
    kept = [p for name, p in weights.items() if name not in quantized]
    storage = float_storage_dtype({p.dtype for p in kept})
    float_bytes = sum(p.numel() for p in kept) * torch.empty(0, dtype=storage).element_size()
    model_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    return left, model_bytes, float_bytes


def profile_model(model: LoadedModel, data: CalibrationData, batch_size: int = 32) -> ModelProfile:
    """Run one batch through the model and describe every quantizable weight it uses.

    MACs are per sample, counted from the shapes the ops actually saw (exact for conv and
    linear). A weight used by several ops (tied embeddings) is one layer with the MACs summed.

    Example:
        >>> profile = profile_model(load_model("m.pt"), load_data("d.npz"))  # doctest: +SKIP
        >>> [(layer.name, layer.macs) for layer in profile.layers]  # doctest: +SKIP
    """
    refs = candidate_weights(model)
    weights = {r.name: r.tensor for r in refs}
    batch = next(iter_batches(model, data, batch_size))
    cap = LayerCapture(refs, keep=False)
    with capture_context(), cap:
        model(*batch.inputs)
    records = cap.records
    if not records:
        raise ModelFormatError(
            "no quantizable layer (convolution, linear, embedding, RNN) was seen in the model's "
            "forward pass",
            code="model_no_layers",
        )
    layouts = _probe_layout(model, data, refs)
    shared = _probe_shared(model, data, refs, records)
    if len(shared) == len(records):
        layouts = [
            "shared" if is_shared else (layouts[i] if i < len(layouts) else "blocked")
            for i, is_shared in enumerate(shared)
        ]
    n = batch.inputs[0].shape[0]
    order: list[str] = []
    info: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        shape = tuple(weights[rec.name].shape)
        entry = info.get(rec.name)
        if entry is None:
            order.append(rec.name)
            entry = info[rec.name] = {"kind": _kind(rec), "shape": shape, "macs": 0, "layouts": []}
            if rec.transposed or entry["kind"].startswith("conv_transpose"):
                entry["transposed"] = True  # stored (in, out, ...): scales follow dim 1
        entry["macs"] += _macs(rec, shape)
        entry["layouts"].append(layouts[i] if i < len(layouts) else "blocked")
    layers = []
    for name in order:
        entry = info[name]
        shape = entry["shape"]
        params = 1
        for s in shape:
            params *= s
        layers.append(
            LayerInfo(
                name=name,
                kind=entry["kind"],
                shape=shape,
                params=params,
                channels=shape[1] if entry.get("transposed") and len(shape) >= 2 else shape[0],
                macs=entry["macs"] // n,
                extra={
                    "layouts": entry["layouts"],
                    **({"transposed": True} if entry.get("transposed") else {}),
                },
            )
        )
    total = sum(p.numel() for p in model.named_weights().values())
    quantized = sum(layer.params for layer in layers)
    left, model_bytes, float_bytes = _what_stays_float(model, {layer.name for layer in layers})
    return ModelProfile(
        layers=layers,
        float_params=total - quantized,
        total_params=total,
        left_in_float=left,
        model_bytes=model_bytes,
        float_bytes=float_bytes,
    )
