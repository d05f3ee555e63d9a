"""Quantization-aware fine-tuning of TorchScript and torch.export models in place."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_core import memory_plan
from mpq_core.data import CalibrationData
from mpq_core.evaluate import model_outputs
from mpq_core.finetune import (
    FinetuneResult,
    _fit,
    _Quantized,
    _Session,
    finetune,
    split_holdout,
)
from mpq_core.intake import LoadedModel, load_model
from mpq_core.progress import null_progress
from mpq_core.quant_primitives import dequantize, quantize
from mpq_core.quantized_weights import quantize_weights
from mpq_core.runner import Batch
from mpq_core.spec import FinetuneSpec
from mpq_core.weight_sets import copy_weights
from tests.conftest import save_bytes, zoo_data, zoo_inputs
from tests.mpq_core.live_tensors import LivePeak
from tests.mpq_core.test_evaluate import LM_BITS, _lm, _lm_data
from tests.zoo import SmallMLP

FORMATS = ["script", "export"]
BITS2 = {"net.0.weight": 2, "net.2.weight": 2, "net.4.weight": 2}
MIXED = {"net.0.weight": 3, "net.2.weight": 2, "net.4.weight": 4}


def _strong_mlp() -> nn.Module:
    """SmallMLP with larger weights: confident logits, so 2-bit weights visibly hurt fidelity."""
    torch.manual_seed(0)
    model = SmallMLP()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


_CACHE: dict[str, bytes] = {}


def _mlp(fmt: str) -> LoadedModel:
    if fmt not in _CACHE:
        _CACHE[fmt] = save_bytes(_strong_mlp(), tuple(zoo_inputs("mlp", 2, seed=0)), fmt)
    return load_model(_CACHE[fmt])


def _scales(model: LoadedModel, bits: dict[str, int]) -> dict[str, torch.Tensor]:
    return {n: layer.scales for n, layer in quantize_weights(model, bits).items()}


def _snapshot(model: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_weights().items()}


def _kl(out: torch.Tensor, teacher: torch.Tensor) -> float:
    logp, logq = F.log_softmax(teacher.double(), -1), F.log_softmax(out.double(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _check_history(res: FinetuneResult) -> None:
    epochs = [int(h["epoch"]) for h in res.history]
    assert epochs == list(range(res.epochs_run + 1))
    losses = [h["val_loss"] for h in res.history]
    assert res.val_loss_before == losses[0]
    assert res.val_loss_after == min(losses)
    assert res.best_epoch == losses.index(min(losses))
    assert all("train_loss" in h for h in res.history[1:])


# --- split_holdout ---------------------------------------------------------------------------


def _indexed(n: int) -> CalibrationData:
    """Samples whose first feature is their index, so a split can be traced back."""
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 16)
    return CalibrationData([x], torch.arange(n) % 5)


def _ids(data: CalibrationData) -> list[int]:
    return [int(v) for v in data.inputs[0][:, 0]]


@pytest.mark.parametrize(
    ("n", "fraction", "held"), [(20, 0.25, 5), (10, 0.1, 1), (7, 0.0, 1), (2, 0.9, 1), (9, 0.9, 8)]
)
def test_split_holdout_sizes_and_disjoint(n: int, fraction: float, held: int) -> None:
    data = _indexed(n)
    train, val = split_holdout(data, fraction, seed=3)
    assert val.num_samples == held
    assert train.num_samples == n - held
    a, b = _ids(train), _ids(val)
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(n))
    assert train.labels is not None and val.labels is not None
    assert [int(v) for v in train.labels] == [i % 5 for i in a]  # labels follow their samples


def test_split_holdout_is_seeded() -> None:
    data = _indexed(40)
    first = _ids(split_holdout(data, 0.25, seed=1)[1])
    assert _ids(split_holdout(data, 0.25, seed=1)[1]) == first
    assert _ids(split_holdout(data, 0.25, seed=2)[1]) != first


def test_split_holdout_of_one_sample_holds_nothing_out() -> None:
    train, val = split_holdout(_indexed(1), 0.5, seed=0)
    assert (train.num_samples, val.num_samples) == (1, 0)


# --- finetune --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_two_bit_model_improves_and_stays_on_grid(fmt: str) -> None:
    model = _mlp(fmt)
    data = zoo_data("mlp", 64)
    scales = _scales(model, BITS2)
    cfg = FinetuneSpec(epochs=3, lr=1e-2, batch_size=8, val_fraction=0.25, patience=5)
    _, val = split_holdout(data, cfg.val_fraction, 0)  # finetune's default seed
    teacher = model_outputs(model, val)
    res = finetune(model, data, BITS2, scales, cfg)
    _check_history(res)
    assert res.best_epoch >= 1
    assert res.val_loss_after < 0.9 * res.val_loss_before
    weights = model.named_weights()
    for name, bits in BITS2.items():
        p = weights[name].detach()
        s = scales[name]
        assert torch.equal(dequantize(quantize(p, s, bits), s), p), f"{name} left its grid"
        assert len(torch.unique(torch.round(p / s[:, None]))) <= 3  # 2 bits: codes -1, 0, 1
    # The reported held-out loss is the loss of the state the model was left in.
    assert _kl(model_outputs(model, val), teacher) == pytest.approx(res.val_loss_after, rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("lr", "improves"), [(10.0, False), (1e-2, True)])
def test_epoch_zero_guarantee(fmt: str, lr: float, improves: bool) -> None:
    """Held-out loss never gets worse; float params change only when a later epoch wins."""
    model = _mlp(fmt)
    data = zoo_data("mlp", 64)
    scales = _scales(model, MIXED)
    before = _snapshot(model)
    cfg = FinetuneSpec(epochs=2, lr=lr, batch_size=8, val_fraction=0.25, patience=5)
    res = finetune(model, data, MIXED, scales, cfg)
    _check_history(res)
    assert res.val_loss_after <= res.val_loss_before
    assert (res.best_epoch > 0) == improves  # lr=10 wrecks the model, lr=1e-2 helps
    after = _snapshot(model)
    others = [n for n in before if n not in MIXED]
    assert others  # the biases
    changed = [n for n in others if not torch.equal(before[n], after[n])]
    for name, bits in MIXED.items():
        s = scales[name]
        assert torch.equal(dequantize(quantize(after[name], s, bits), s), after[name])
    if res.best_epoch == 0:
        assert changed == []
        assert res.val_loss_after == res.val_loss_before
        for name, bits in MIXED.items():  # exactly the quantized float weights
            s = scales[name]
            assert torch.equal(after[name], dequantize(quantize(before[name], s, bits), s))
    else:
        assert changed, "a later epoch was picked but no float parameter moved"


@pytest.mark.parametrize("fmt", FORMATS)
def test_requires_grad_flags_restored(fmt: str) -> None:
    model = _mlp(fmt)
    params = model.named_weights()
    flags = {n: i % 2 == 0 for i, n in enumerate(params)}
    for n, p in params.items():
        p.requires_grad_(flags[n])
    finetune(
        model,
        zoo_data("mlp", 24),
        MIXED,
        _scales(model, MIXED),
        FinetuneSpec(epochs=1, lr=1e-3, batch_size=8),
    )
    assert {n: p.requires_grad for n, p in model.named_weights().items()} == flags
    assert all(p.grad is None for p in params.values())  # no gradients left behind


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("epochs", "steps", "epochs_run"), [(10, 3, 1), (0, 7, 2), (1, 10, 2)])
def test_steps_override_epochs(fmt: str, epochs: int, steps: int, epochs_run: int) -> None:
    # 48 samples, 12 held out, 36 trained on in batches of 8: 5 steps per epoch.
    model = _mlp(fmt)
    events: list[tuple[str, float, dict[str, Any]]] = []
    res = finetune(
        model,
        zoo_data("mlp", 48),
        MIXED,
        _scales(model, MIXED),
        FinetuneSpec(
            epochs=epochs, steps=steps, lr=1e-3, batch_size=8, val_fraction=0.25, patience=50
        ),
        progress=lambda stage, f, m: events.append((stage, f, m)),
    )
    assert res.epochs_run == epochs_run == math.ceil(steps / 5)
    assert len(res.history) == epochs_run + 1
    _check_history(res)
    step_events = [f for stage, f, m in events if "loss" in m and "epoch" in m]
    assert len(step_events) == steps
    assert step_events == pytest.approx([(i + 1) / steps for i in range(steps)])
    assert {stage for stage, _, _ in events} == {"finetune"}
    assert events[-1][1] == 1.0 and events[-1][2]["best_epoch"] == res.best_epoch


@pytest.mark.parametrize("fmt", FORMATS)
def test_epochs_without_steps_and_patience(fmt: str) -> None:
    model = _mlp(fmt)
    data = zoo_data("mlp", 48)
    # lr=10 makes every epoch worse than epoch 0: patience 2 stops after two epochs.
    res = finetune(
        model,
        data,
        MIXED,
        _scales(model, MIXED),
        FinetuneSpec(epochs=6, lr=10.0, batch_size=8, val_fraction=0.25, patience=2),
    )
    assert res.epochs_run == 2 and res.best_epoch == 0
    _check_history(res)
    zero = finetune(model, data, MIXED, _scales(model, MIXED), FinetuneSpec(epochs=0, batch_size=8))
    assert zero.epochs_run == 0 and zero.history == [{"epoch": 0, "val_loss": zero.val_loss_before}]


def test_fixed_batch_program_runs_every_epoch_in_full(
    zoo_bytes: Callable[[str, str], bytes],
) -> None:
    """A fixed-batch torch.export program (batch 4) runs in batches of 4 whatever
    ``batch_size`` says, so an epoch is ceil(36 / 4) = 9 steps, and 3 epochs are 3 epochs."""
    model = load_model(zoo_bytes("mlp", "export_fixed"))
    assert model.fixed_batch == 4
    events: list[dict[str, Any]] = []
    res = finetune(
        model,
        zoo_data("mlp", 48),  # 12 held out, 36 trained on
        MIXED,
        _scales(model, MIXED),
        FinetuneSpec(epochs=3, lr=1e-3, batch_size=8, val_fraction=0.25, patience=50),
        progress=lambda _s, _f, m: events.append(m),
    )
    _check_history(res)
    steps = [m for m in events if "epoch" in m and "loss" in m]
    # An epoch is counted in the model's fixed batches (4), not in the configured batch size
    # (8): 3 full epochs of ceil(36 / 4) = 9 steps each, none cut short.
    assert res.epochs_run == 3
    assert len(steps) == 3 * 9


# --- the teacher: recomputed per batch from the original float parameters --------------------


class _CachedTeacher(_Session):
    """Fine-tuning as it was before the teacher was recomputed: the float model's outputs on
    every sample computed once, before any weight changes, and looked up per batch (by the
    sample's input, so the shuffled order needs no bookkeeping)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache: dict[bytes, torch.Tensor] = {}
        for split in (self.train, self.val):
            outs = model_outputs(self.model, split, output_key=self.output_key)
            for x, y in zip(split.inputs[0], outs, strict=True):
                self.cache[x.numpy().tobytes()] = y

    def teacher(self, batch: Batch) -> torch.Tensor:
        rows = batch.inputs[0][: batch.valid]
        return torch.stack([self.cache[x.numpy().tobytes()] for x in rows])


def _session(
    model: LoadedModel,
    data: CalibrationData,
    cfg: FinetuneSpec,
    session: type[_Session] = _Session,
) -> _Session:
    """A fine-tuning run of ``model`` at ``MIXED`` bits, symmetric per-channel scales."""
    quantized = _Quantized(model, MIXED, _scales(model, MIXED), None, ())
    return session(model, data, quantized, cfg, 0, teacher=None, act_quant=None, output_key=None)


def _finetuned(
    model: LoadedModel, session: type[_Session]
) -> tuple[FinetuneResult, dict[str, torch.Tensor]]:
    data = zoo_data("mlp", 64)
    cfg = FinetuneSpec(epochs=3, lr=1e-2, batch_size=8, val_fraction=0.25, patience=5)
    run = _session(model, data, cfg, session)
    return _fit(run, null_progress, 0.0), _snapshot(model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_recomputed_teacher_trains_as_the_cached_teacher_did(fmt: str) -> None:
    got, got_weights = _finetuned(_mlp(fmt), _Session)
    want, want_weights = _finetuned(_mlp(fmt), _CachedTeacher)
    assert got.best_epoch == want.best_epoch >= 1  # it trained, and picked the same epoch
    assert len(got.history) == len(want.history)
    for a, b in zip(got.history, want.history, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for name, value in want_weights.items():
        assert torch.allclose(got_weights[name], value, rtol=0, atol=1e-5), name


def test_teacher_is_the_original_float_model_after_training_moved_every_parameter() -> None:
    """Biases train too: the teacher must use their original values, not the trained ones."""
    model = _mlp("script")
    data = zoo_data("mlp", 32)
    float_out = model_outputs(model, data)
    cfg = FinetuneSpec(epochs=2, lr=1e-1, batch_size=8, val_fraction=0.25, patience=5)
    run = _session(model, data, cfg)
    run.train_epoch(1, null_progress)
    run.q.load()
    trained = _snapshot(model)
    assert all(not torch.equal(trained[n], run.originals[n]) for n in trained)  # all moved
    batch = Batch(inputs=data.inputs, labels=data.labels, valid=32, start=0)
    assert torch.allclose(run.teacher(batch), float_out, rtol=0, atol=1e-6)
    after = _snapshot(model)  # and the model holds the training state again
    assert all(torch.equal(after[n], trained[n]) for n in trained)
    run.finish(run.state())


def _finetune_peak(samples: int) -> int:
    model = _lm()
    scales = {n: layer.scales for n, layer in quantize_weights(model, LM_BITS).items()}
    cfg = FinetuneSpec(epochs=1, lr=1e-3, batch_size=8, val_fraction=0.25, patience=5)
    with LivePeak() as probe:
        finetune(model, _lm_data(samples), LM_BITS, scales, cfg)
    return probe.peak


def test_finetune_memory_is_bounded_by_a_batch_not_the_samples() -> None:
    # Full batches of 8 in both runs: 32 samples hold out 8, 256 hold out 64.
    small, large = _finetune_peak(32), _finetune_peak(256)
    # What may grow: split_holdout copies the data into its two parts and each epoch copies the
    # shuffled training part (token ids and labels, int64), three copies of the inputs at most.
    # Outputs may not: the old cached teacher alone grew by 224 samples' scores, 3.2 MB.
    inputs = 12 * 8 * 2  # bytes of one sample's ids and labels
    assert large - small <= 3 * (256 - 32) * inputs, (small, large)


@pytest.mark.parametrize("fmt", FORMATS)
def test_micro_batches_take_the_steps_whole_batches_take(fmt: str) -> None:
    """A memory budget runs each step's batch of 8 as micro-batches of 3 (3, 3, 2) with the
    gradients accumulated: the training must be the one whole batches give."""
    data = zoo_data("mlp", 64)
    cfg = FinetuneSpec(epochs=3, lr=1e-2, batch_size=8, val_fraction=0.25, patience=5)
    whole_model, micro_model = _mlp(fmt), _mlp(fmt)
    scales = _scales(whole_model, MIXED)
    whole = finetune(whole_model, data, MIXED, scales, cfg)
    micro = finetune(micro_model, data, MIXED, scales, cfg, micro_batch_size=3)
    assert micro.best_epoch == whole.best_epoch >= 1
    for a, b in zip(micro.history, whole.history, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    want = _snapshot(whole_model)
    for name, value in _snapshot(micro_model).items():
        assert torch.allclose(value, want[name], rtol=0, atol=1e-4), name
    # Steps of 3 without accumulation train another model: the comparison can tell.
    small_model = _mlp(fmt)
    finetune(small_model, data, MIXED, scales, FinetuneSpec(**{**cfg.__dict__, "batch_size": 3}))
    small = _snapshot(small_model)
    assert not all(torch.allclose(small[n], want[n], rtol=0, atol=1e-4) for n in want)


# --- what fine-tuning holds: the copies of the weights the memory plan counts -----------------


def _wide_mlp(fmt: str, dtype: torch.dtype) -> tuple[LoadedModel, CalibrationData]:
    """Four 256x256 layers and 16 samples: the weights dwarf the activations, so the peak
    is the copies of the weights."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).to(dtype)
    x = torch.randn(16, 256, dtype=dtype)
    return load_model(save_bytes(net, (x[:2],), fmt)), CalibrationData([x])


@pytest.mark.parametrize(
    ("fmt", "dtype", "epochs", "teacher"),
    [
        ("script", torch.float32, 1, False),
        ("export", torch.float32, 1, True),
        ("script", torch.bfloat16, 1, True),
        ("script", torch.float32, 3, True),
    ],
)
def test_finetune_holds_the_copies_of_the_weights_the_memory_plan_counts(
    fmt: str, dtype: torch.dtype, epochs: int, teacher: bool
) -> None:
    """The plan counts the teacher's weights, masters, Adam's two moments and the gradients
    (five copies), a sixth for the best state when more epochs can follow, three float32
    copies of the largest layer and a batch's graph. Before the teacher was swapped by reference and the
    gradients moved to the masters, fine-tuning held almost nine."""
    model, data = _wide_mlp(fmt, dtype)
    weights = model.named_weights()
    bits = {n: 4 for n in weights if n.endswith("weight")}
    model_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    largest = max(p.numel() for p in weights.values()) * 4
    given = copy_weights(model) if teacher else None  # made before the count starts
    copies = memory_plan._MODEL_COPIES["finetune"] - (1 if teacher else 0)
    copies += memory_plan._BEST_STATE if epochs > 1 else 0
    cfg = FinetuneSpec(epochs=epochs, lr=1e-3, batch_size=8, val_fraction=0.25, patience=5)
    scales = _scales(model, bits)
    with LivePeak() as probe:
        finetune(model, data, bits, scales, cfg, teacher=given)
    batch = 8 * memory_plan.measure_sample(model, data).bytes_for("finetune")  # the graph
    planned = copies * model_bytes + memory_plan._FINETUNE_LAYER_COPIES * largest + batch
    # Above the copies bar one (the best state may never be needed), at most the plan.
    assert (copies - 1) * model_bytes < probe.peak <= planned, (probe.peak / model_bytes, copies)
