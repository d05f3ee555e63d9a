from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mpq_core.data import CalibrationData
from mpq_core.intake import load_model
from mpq_core.profiling import profile_model
from mpq_core.quant_primitives import (
    choose_params_many,
    choose_scales_many,
    dequantize,
    errors_from_scales,
    quantization_errors,
    quantize,
    round_to_float16,
)
from mpq_core.scheme import QuantScheme
from mpq_core.sensitivity.fisher import contraction_dtype, fisher_sensitivity
from mpq_core.sensitivity.layer_errors import LayerErrors
from tests.conftest import save_bytes
from tests.mpq_core.test_fisher import reference_omega


class _StackWatch(TorchDispatchMode):
    """Records every tensor any op produces with one of ``shapes`` and, after every op, the
    bytes of the distinct storages such tensors still alive hold (views share theirs)."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes
        self.live: list[weakref.ref[torch.Tensor]] = []
        self.seen = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                self.live.append(weakref.ref(t))
                self.seen += 1
        alive = [t for t in (r() for r in self.live) if t is not None]
        self.live = [weakref.ref(t) for t in alive]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.peak_bytes = max(self.peak_bytes, sum(storages.values()))
        return out


def test_errors_from_scales_is_quantization_errors() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    bits = [2, 5, 8]
    stack = errors_from_scales(w, bits, choose_scales_many(w, bits))
    assert torch.equal(stack, quantization_errors(w, bits))
    for dtype in (torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        got = errors_from_scales(wd, bits, choose_scales_many(wd, bits))
        assert got.dtype == dtype and torch.equal(got, quantization_errors(wd, bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(), QuantScheme(symmetric=False), QuantScheme(group_size=32, symmetric=False)],
    ids=["channel-sym", "channel-asym", "g32-asym"],
)
def test_errors_are_exactly_the_quantized_weight_minus_the_weight(
    scheme: QuantScheme, dtype: torch.dtype
) -> None:
    w = (torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 0.2).to(dtype)
    bits = [2, 3, 5, 8, 16]
    scales, zeros = choose_params_many(w, bits, scheme)
    # A float32 buffer, as LayerErrors uses: the difference of two 16-bit values is exact.
    stack = errors_from_scales(w, bits, scales, zeros=zeros, out=torch.empty(5, 8, 64))
    for j, b in enumerate(bits):
        if b == 16:
            wq = round_to_float16(w)
        else:
            z = None if zeros is None else zeros[j]
            wq = dequantize(quantize(w, scales[j], b, z), scales[j], dtype=dtype, zeros=z)
        assert torch.equal(stack[j], wq.float() - w.float()), b
    own = errors_from_scales(w, bits, scales, zeros=zeros)  # no buffer: in the weight's dtype
    assert own.dtype == dtype and torch.equal(own, stack.to(dtype))


def test_layer_errors_builds_each_layer_from_its_own_weight() -> None:
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(4, 10, generator=g), "b": torch.randn(7, 3, generator=g)}
    errors = LayerErrors(weights, ["a", "b"], [2, 4])
    for name in ("a", "b", "a", "a", "b"):
        assert torch.equal(errors[name], quantization_errors(weights[name], [2, 4]))


def test_fisher_holds_one_layer_error_stack_at_a_time() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 5)
    )
    model = load_model(save_bytes(net, (torch.randn(2, 12),), "trace"))
    data = CalibrationData(inputs=[torch.randn(40, 12)], labels=torch.randint(0, 5, (40,)))
    profile = profile_model(model, data)
    bits = [2, 3, 4, 8]
    weights = model.named_weights()
    sizes = [len(bits) * weights[layer.name].numel() * 4 for layer in profile.layers]
    shapes = {(len(bits), *weights[layer.name].shape) for layer in profile.layers}
    with _StackWatch(shapes) as watch:
        omega = fisher_sensitivity(model, data, profile, bits, batch_size=8)
    assert watch.seen >= len(profile.layers)  # every layer's stack went by the watch
    # All layers' stacks together would be sum(sizes); one layer's at a time is max(sizes).
    assert 0 < watch.peak_bytes <= max(sizes) < sum(sizes), (watch.peak_bytes, sizes)
    # Omega as the all-layers-up-front reference computes it.
    want = reference_omega(model, data, profile, bits, batch_size=8)
    got = torch.tensor(omega, dtype=torch.float64)
    assert bool((want > 0).all())
    assert float(((got - want).abs() / want).max()) <= 1e-4


def test_a_bfloat16_stack_is_the_float32_stack_rounded() -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(64, 96).bfloat16(), "b": torch.randn(32, 64).bfloat16()}
    exact = LayerErrors(weights, ["a", "b"], [2, 4, 8, 16])
    rounded = LayerErrors(weights, ["a", "b"], [2, 4, 8, 16], dtype=torch.bfloat16)
    for name in ("a", "b"):
        want = exact[name].clone()
        got = rounded[name]
        assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
        assert torch.equal(got, want.bfloat16())


@pytest.mark.parametrize(
    ("dtypes", "want"),
    [
        ((torch.bfloat16, torch.bfloat16), torch.bfloat16),
        ((torch.bfloat16, torch.float32), torch.float32),
        ((torch.float16, torch.float16), torch.float32),  # float16's range flushes gradients
        ((torch.float32,), torch.float32),
        ((), torch.float32),
    ],
)
def test_the_contraction_runs_in_bfloat16_only_for_an_all_bfloat16_model(
    dtypes: tuple[torch.dtype, ...], want: torch.dtype
) -> None:
    assert contraction_dtype([torch.zeros(2, dtype=d) for d in dtypes]) == want
