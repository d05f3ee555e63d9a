"""Data the user got wrong fails the job at intake with a data code (never ``invalid_spec`` or
an unexpected error): too few samples, NaN or infinite inputs, labels of the wrong shape or out
of range, and a device index the machine does not have."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from mpq_core.errors import DataMismatch, MpqError
from mpq_core.pipeline import resolve_device, run
from mpq_core.spec import JobSpec
from tests.conftest import zoo_data, zoo_module
from tests.support.files import npz_bytes
from tests.zoo import SmallMLP, torchscript_bytes

N, FEATURES, CLASSES = 24, 16, 5
Arrays = dict[str, np.ndarray]


@functools.cache
def _model() -> bytes:
    torch.manual_seed(0)
    return torchscript_bytes(SmallMLP(), (torch.randn(2, FEATURES),))


def _arrays(n: int = N) -> Arrays:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    return {"input": x, "labels": rng.integers(0, CLASSES, n)}


def _with(**changes: Callable[[Arrays], np.ndarray]) -> Callable[[], Arrays]:
    def build() -> Arrays:
        arrays = _arrays()
        for key, change in changes.items():
            arrays[key] = change(arrays)
        return arrays

    return build


def _nan_at(index: tuple[int, int], value: float) -> Callable[[Arrays], np.ndarray]:
    def put(arrays: Arrays) -> np.ndarray:
        x = arrays["input"].copy()
        x[index] = value
        return x

    return put


def _spec(epochs: int = 0, **extra: object) -> JobSpec:
    return JobSpec.from_dict(
        {"budgets": ["avg-bits=4"], "bits": [2, 4, 8], "finetune": {"epochs": epochs}, **extra}
    )


def _failure(arrays: Arrays, spec: JobSpec, eval_arrays: Arrays | None = None) -> MpqError:
    eval_data = None if eval_arrays is None else npz_bytes(**eval_arrays)
    with pytest.raises(MpqError) as info:
        run(spec, _model(), npz_bytes(**arrays), eval_data=eval_data)
    return info.value


@pytest.mark.parametrize(
    ("build", "code", "fragment"),
    [
        pytest.param(lambda: _arrays(0), "data_too_few_samples", "0 sample", id="zero-samples"),
        pytest.param(lambda: _arrays(1), "data_too_few_samples", "1 sample", id="one-sample"),
        pytest.param(
            _with(input=_nan_at((3, 4), np.nan)), "data_not_finite", "sample 3", id="nan-input"
        ),
        pytest.param(
            _with(input=_nan_at((5, 0), np.inf)), "data_not_finite", "sample 5", id="inf-input"
        ),
        pytest.param(
            _with(input=_nan_at((7, 1), -np.inf)), "data_not_finite", "sample 7", id="-inf-input"
        ),
        pytest.param(
            _with(labels=lambda a: a["labels"][:, None]), "data_labels", "(1,)", id="labels-column"
        ),
        pytest.param(
            _with(labels=lambda a: np.eye(CLASSES, dtype=np.int64)[a["labels"]]),
            "data_labels",
            "per-sample shape (5,)",
            id="labels-one-hot",
        ),
        pytest.param(
            _with(labels=lambda a: a["labels"].reshape(-1, 1, 1)),
            "data_labels",
            "shape (24, 1, 1)",
            id="labels-3d",
        ),
        pytest.param(
            _with(labels=lambda a: a["labels"] + CLASSES), "data_labels", "range", id="labels-high"
        ),
        pytest.param(
            _with(labels=lambda a: a["labels"] - CLASSES), "data_labels", "range", id="labels-neg"
        ),
    ],
)
def test_bad_data_fails_with_its_data_code(
    build: Callable[[], Arrays], code: str, fragment: str
) -> None:
    err = _failure(build(), _spec())
    assert isinstance(err, DataMismatch)
    assert (err.code, fragment in err.message) == (code, True), err.message


def test_nan_without_labels_is_a_data_code_not_invalid_spec() -> None:
    arrays = _with(input=_nan_at((0, 0), np.nan))()
    del arrays["labels"]
    assert _failure(arrays, _spec()).code == "data_not_finite"


def test_fine_tuning_needs_two_samples_left_after_the_evaluation_split() -> None:
    err = _failure(_arrays(2), _spec(epochs=1))
    assert err.code == "data_too_few_samples" and "finetune.epochs" in err.message
    run(_spec(epochs=0), _model(), npz_bytes(**_arrays(2)))  # the same data without fine-tuning


def test_one_evaluation_sample_is_enough_but_zero_is_not() -> None:
    run(_spec(), _model(), npz_bytes(**_arrays()), eval_data=npz_bytes(**_arrays(1)))
    assert _failure(_arrays(), _spec(), eval_arrays=_arrays(0)).code == "data_too_few_samples"


def test_nan_in_evaluation_data_is_refused_too() -> None:
    bad = _with(input=_nan_at((0, 2), np.nan))()
    assert _failure(_arrays(), _spec(), eval_arrays=bad).code == "data_not_finite"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has cuda:0")
def test_absent_cuda_device_is_device_unavailable() -> None:
    with pytest.raises(MpqError) as info:
        resolve_device("cuda:0")
    assert info.value.code == "device_unavailable"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to name a missing index")
def test_device_index_past_the_last_gpu_is_device_unavailable() -> None:
    with pytest.raises(MpqError) as info:
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert info.value.code == "device_unavailable"
    assert resolve_device("cuda:0").index == 0


class _NanHead(torch.nn.Module):
    """A model that answers NaN on any input (a broken export, an overflowing float16 model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.log(-torch.ones_like(x[:, :1]))


def test_model_answering_nan_on_finite_data_is_output_not_finite() -> None:
    model = torchscript_bytes(_NanHead(), (torch.randn(2, FEATURES),))
    with pytest.raises(DataMismatch) as info:
        run(_spec(), model, npz_bytes(**_arrays()))
    assert info.value.code == "output_not_finite"


def test_token_id_past_the_vocabulary_deep_in_the_data_is_data_out_of_range() -> None:
    """The first probe batch is fine; sample 17 holds an id the embedding does not have."""
    data = zoo_data("text", N)
    model = torchscript_bytes(zoo_module("text"), tuple(t[:2] for t in data.inputs))
    ids = data.inputs[0].clone()
    ids[17, 3] = 30  # the vocabulary is 0..29
    arrays = {"input_0": ids.numpy(), "input_1": data.inputs[1].numpy()}
    with pytest.raises(DataMismatch) as info:
        run(_spec(), model, npz_bytes(**arrays))
    assert info.value.code == "data_out_of_range"
    assert "sample 17 (input 0 holds 30)" in info.value.message
    assert "index out of range" in info.value.message
    run(_spec(), model, npz_bytes(input_0=data.inputs[0].numpy(), input_1=arrays["input_1"]))
