"""Hostile uploads through the worker (run_job without a broker): each job fails with the
intake guard's code and a message, the payload never runs, nothing is stored as an artifact."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.support import hostile_files as hostile
from tests.worker.conftest import Env

MODELS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "pt2-weight-use-pickle": (hostile.pt2_pickled_weight, "model_pickle"),
    "pt2-sample-inputs-fallback": (hostile.pt2_pickled_sample_inputs, "model_pickle"),
    "pt2-opaque-object": (hostile.pt2_opaque_constant, "model_pickle"),
    "pt2-sympy-expr": (hostile.pt2_sympy_expr, "model_unsafe_op"),
    "pt2-guards-code": (hostile.pt2_guard_code, "model_unsafe_op"),
    "script-setstate-from-file": (
        lambda marker: hostile.script_bytes(hostile.TouchesOnLoad(str(marker))),
        "model_unsafe_op",
    ),
    "script-forward-from-file": (
        lambda marker: hostile.script_bytes(hostile.ReadsFiles(str(marker))),
        "model_unsafe_op",
    ),
    "script-1gib-record": (lambda marker: hostile.torchscript_bomb(), "archive_too_large"),
}
DATA: dict[str, tuple[Callable[[], bytes], str]] = {
    "npz-compressed-bomb": (hostile.npz_bomb, "data_too_large"),
    "npz-huge-header": (lambda: hostile.npz_with_header((10**9, 10**4)), "data_too_large"),
}


@pytest.mark.parametrize("name", MODELS)
def test_hostile_model_fails_the_job_with_its_code(env: Env, name: str, tmp_path: Path) -> None:
    make, code = MODELS[name]
    marker = tmp_path / "marker"
    job_id = env.create_job(model_id=env.upload_model(make(marker)))
    env.run_job(job_id)
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", code), job.error_message
    assert job.error_message and "Traceback" not in job.error_message
    assert job.artifacts == []
    assert not marker.exists()


@pytest.mark.parametrize("name", DATA)
def test_hostile_data_fails_the_job_with_its_code(env: Env, name: str) -> None:
    make, code = DATA[name]
    job_id = env.create_job(dataset_id=env.upload_data(make()))
    env.run_job(job_id)
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", code), job.error_message
    assert job.artifacts == []


def test_the_services_upload_limit_bounds_what_archives_may_expand_to(
    make_env: Callable[..., Env],
) -> None:
    # 1 MiB uploads: archives may expand to 4 MiB; this model's records hold 5.8 MB. The worker
    # hands its limit to the sandboxed child, whose intake refuses the model.
    env = make_env(max_upload_bytes=2**20)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(1200, 1200)), buffer)
    job_id = env.create_job(model_id=env.upload_model(buffer.getvalue()))
    env.run_job(job_id)
    job = env.job(job_id)
    assert (job.status, job.error_code) == ("failed", "archive_too_large"), job.error_message
