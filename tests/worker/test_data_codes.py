"""A job whose data or stored spec is the user's mistake ends ``failed`` with that mistake's code
and a message saying what to fix, never ``internal_error`` and never ``succeeded``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.support.files import npz_bytes
from tests.worker.conftest import SPEC, Env


def _mlp(n: int = 24, **changes: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "input": rng.standard_normal((n, 16)).astype(np.float32),
        "labels": rng.integers(0, 5, n),
    }
    arrays.update(changes)
    return arrays


def _nan_input() -> dict[str, np.ndarray]:
    arrays = _mlp()
    arrays["input"][2, 3] = np.nan
    return arrays


@pytest.mark.parametrize(
    ("arrays", "code"),
    [
        (lambda: _mlp(0), "data_too_few_samples"),
        (lambda: _mlp(1), "data_too_few_samples"),
        (_nan_input, "data_not_finite"),
        (lambda: _mlp(labels=np.zeros((24, 2), np.int64)), "data_labels"),
        (lambda: _mlp(labels=np.full(24, 99)), "data_labels"),
    ],
    ids=["zero-samples", "one-sample", "nan-input", "2d-labels", "labels-out-of-range"],
)
def test_bad_data_fails_the_job_with_a_data_code(
    env: Env, arrays: Callable[[], dict[str, np.ndarray]], code: str
) -> None:
    job = env.run_job(env.create_job(dataset_id=env.upload_data(npz_bytes(**arrays()))))
    assert (job.status, job.error_code) == ("failed", code), job.error_message
    assert job.error_message and "Traceback" not in job.error_message
    assert job.artifacts == []


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({**SPEC, "seed": "7"}, "spec_type"),
        ({**SPEC, "batch_size": 2.5}, "spec_type"),
        ({**SPEC, "pins": {"(a)\\1": 4}}, "invalid_regex"),
        ({**SPEC, "pins": {"(a+)+$": 4}}, "invalid_spec"),  # matches no layer, in bounded time
    ],
    ids=["seed-string", "batch-fraction", "backreference-pin", "catastrophic-pin"],
)
def test_stored_spec_refused_by_the_worker_with_its_code(
    env: Env, spec: dict[str, Any], code: str
) -> None:
    """A spec stored before these checks existed (rows are never re-validated by the API)."""
    job = env.run_job(env.create_job(spec=spec))
    assert (job.status, job.error_code) == ("failed", code), job.error_message
