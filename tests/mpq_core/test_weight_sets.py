"""``swapped_in``: another set of weights for a forward pass, by reference, and back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mpq_core.intake import LoadedModel, load_model
from mpq_core.weight_sets import copy_weights, swapped_in
from tests.conftest import save_bytes
from tests.mpq_core.live_tensors import LivePeak
from tests.mpq_core.test_packed_checkpoint import TiedLM

FORMATS = ["script", "trace", "export"]


def _model(fmt: str) -> tuple[LoadedModel, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 5))  # TiedLM: an embedding that is also the output head
    return load_model(save_bytes(TiedLM().eval(), (ids[:2],), fmt)), ids


@pytest.mark.parametrize("fmt", FORMATS)
def test_swapped_weights_run_as_if_loaded_and_the_model_gets_its_own_back(fmt: str) -> None:
    model, ids = _model(fmt)
    own = copy_weights(model)
    mine = model(ids).detach()
    other = {n: torch.randn_like(w) for n, w in own.items()}  # the tied weight once
    with swapped_in(model, other):
        swapped = model(ids).detach()
    after = model(ids).detach()
    # The same set copied in gives the same outputs: both uses of the tied weight swapped.
    reference, _ = _model(fmt)
    with torch.no_grad():
        for name, p in reference.named_weights().items():
            p.copy_(other[name])
    assert torch.equal(swapped, reference(ids).detach())
    assert not torch.allclose(swapped, mine)
    assert torch.equal(after, mine)
    assert all(torch.equal(p, own[n]) for n, p in model.named_weights().items())
    assert all(p.data_ptr() != other[n].data_ptr() for n, p in model.named_weights().items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_swapping_copies_nothing(fmt: str) -> None:
    """Inside the block the parameters are the given tensors (no copy of the model is made to
    hold either set), and no tensor is allocated."""
    model, _ = _model(fmt)
    other = {n: torch.randn_like(w) for n, w in copy_weights(model).items()}
    with LivePeak() as probe, swapped_in(model, other):
        params = model.named_weights()
        assert all(params[n].data_ptr() == w.data_ptr() for n, w in other.items())
    assert probe.peak == 0


def test_the_model_gets_its_weights_back_when_the_block_raises() -> None:
    model, ids = _model("script")
    mine = model(ids).detach()
    other = {n: torch.zeros_like(w) for n, w in copy_weights(model).items()}
    with pytest.raises(RuntimeError, match="inside"), swapped_in(model, other):
        raise RuntimeError("inside")
    assert torch.equal(model(ids).detach(), mine)


@pytest.mark.parametrize(
    "change",
    [lambda w: w.double(), lambda w: w[:-1], lambda w: w.t().contiguous()],
    ids=["dtype", "shape", "transposed"],
)
def test_a_tensor_that_does_not_fit_its_parameter_is_refused_and_nothing_stays_swapped(
    change: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    model, ids = _model("script")
    mine = model(ids).detach()
    own = copy_weights(model)
    tied = next(n for n, w in own.items() if w.shape == (20, 8))
    # The layer that fits comes first, so it is swapped when the misfit is found.
    other = {"mix.weight": torch.zeros_like(own["mix.weight"]), tied: change(own[tied])}
    with pytest.raises(ValueError, match="cannot stand in"), swapped_in(model, other):
        pass
    assert torch.equal(model(ids).detach(), mine)
