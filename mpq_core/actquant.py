"""Activation quantization: per-tensor fake quantization of every quantizable layer's input.

Like the weight capture, this works from inside the dispatcher, so it applies to TorchScript
and torch.export models alike without changing them: ``ActivationQuantizer`` is a
TorchDispatchMode that replaces the activation argument of each convolution / matmul that
consumes a quantized weight with its fake-quantized value. It runs below autograd, so gradients
pass straight through (the straight-through estimator) during fine-tuning.

Encodings are symmetric for signed activations (codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``) and
unsigned for non-negative ones, e.g. after ReLU (codes in ``[0, 2^b - 1]``); zero point 0 either
way. The clipping of each tensor minimises the squared error on the calibration data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpq_core.capture import (
    LayerCapture,
    OpRecord,
    WeightRef,
    WeightUse,
    capture_context,
    weight_use,
)
from mpq_core.data import CalibrationData
from mpq_core.intake import LoadedModel
from mpq_core.runner import iter_batches

__all__ = ["ActEncoding", "ActivationQuantizer", "calibrate_activations"]

_SAMPLE = 1 << 16  # activation values kept per layer to choose its clipping
_CLIP_GRID = torch.linspace(0.3, 1.0, 36)


@dataclass(frozen=True)
class ActEncoding:
    """How the input activation of one layer is quantized."""

    bits: int
    scale: float
    signed: bool
    zero_point: int = 0

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale), self.qmin, self.qmax)
        return (q * self.scale).to(x.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min": self.qmin * self.scale, "max": self.qmax * self.scale}


def _choose(values: torch.Tensor, bits: int) -> ActEncoding:
    signed = bool((values < 0).any())
    amax = float(values.abs().max()) if values.numel() else 1.0
    amax = amax if amax > 0 else 1.0
    best: ActEncoding | None = None
    best_err = float("inf")
    for ratio in _CLIP_GRID.tolist():
        enc = ActEncoding(
            bits=bits,
            scale=amax * ratio / (2 ** (bits - 1) - 1 if signed else 2**bits - 1),
            signed=signed,
        )
        err = float(((enc.fake_quantize(values) - values) ** 2).sum())
        if err < best_err:
            best, best_err = enc, err
    assert best is not None
    return best


def calibrate_activations(
    model: LoadedModel,
    data: CalibrationData,
    layer_names: list[str],
    bits: int,
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, ActEncoding]:
    """Per-tensor encodings of the inputs of ``layer_names`` (convolutions and linears), from a
    random sample of each input's values over the calibration data."""
    weights = model.named_weights()
    refs = [WeightRef(n, weights[n]) for n in layer_names]
    # Per layer, a uniform sample of the per-batch samples so far, bounded whatever the number
    # of batches: each value drawn gets a random key and the _SAMPLE smallest keys stay (a
    # bottom-k sample of the union is a uniform sample of it).
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extremes: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def keep(rec: OpRecord) -> None:
        if rec.kind in ("embedding", "rnn"):
            return
        x = rec.x.detach().reshape(-1).float().cpu()
        take = x[torch.randint(0, x.numel(), (min(x.numel(), _SAMPLE // 4),), generator=gen)]
        keys = torch.rand(take.numel(), generator=gen)
        if rec.name in kept:
            values, old_keys = kept[rec.name]
            take, keys = torch.cat([values, take]), torch.cat([old_keys, keys])
        if take.numel() > _SAMPLE:
            smallest = torch.topk(keys, _SAMPLE, largest=False).indices
            take, keys = take[smallest], keys[smallest]
        kept[rec.name] = (take, keys)
        # The extremes always join the sample, so the grid spans the full range.
        ext = torch.stack([x.min(), x.max()])
        if rec.name in extremes:
            both = torch.cat([extremes[rec.name], ext])
            ext = torch.stack([both.min(), both.max()])
        extremes[rec.name] = ext

    with capture_context(grad=False):
        for batch in iter_batches(model, data, batch_size):
            cap = LayerCapture(refs, keep=False, on_record=keep)
            with cap:
                model(*batch.inputs)
    return {
        name: _choose(torch.cat([values, extremes[name]]), bits)
        for name, (values, _) in kept.items()
    }


class ActivationQuantizer(TorchDispatchMode):
    """Fake-quantize the activation input of every op that consumes one of the encoded layers.

    Args:
        weights: the layers' weight tensors, by name (matched by storage and shape).
        encodings: the encoding of each layer's input.
    """

    def __init__(self, weights: dict[str, torch.Tensor], encodings: dict[str, ActEncoding]) -> None:
        super().__init__()
        self._by_ptr: dict[int, list[tuple[torch.Tensor, ActEncoding]]] = {}
        for name, enc in encodings.items():
            w = weights[name]
            self._by_ptr.setdefault(w.data_ptr(), []).append((w, enc))

    def _enc(self, use: WeightUse) -> ActEncoding | None:
        if not isinstance(use.weight, torch.Tensor):
            return None
        for param, enc in self._by_ptr.get(use.weight.data_ptr(), ()):
            if use.matches(param) is not None:
                return enc
        return None

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        use = weight_use(func, args)
        if use is not None and use.op != "embedding":
            enc = self._enc(use)
            if enc is not None:
                i = use.x_index
                args = (*args[:i], enc.fake_quantize(args[i]), *args[i + 1 :])
        return func(*args, **kwargs)
