"""The memory plan: batch sizes chosen from a budget keep a whole job within it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.decoders import DecoderConfig, traced_decoder
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.intake import load_model
from mpq_core.memory_plan import (
    MemoryPlan,
    machine_memory,
    measure_sample,
    plan_memory,
    status_bytes,
)
from mpq_core.progress import STAGES
from mpq_core.spec import JobSpec, parse_max_memory
from tests.zoo import SmallMLP, torchscript_bytes

# A GPT-2-style decoder whose logits dominate a sample's memory (vocabulary 8192, 128 tokens:
# 4 MiB of logits a sequence), traced to TorchScript as users export one.
_DECODER = """
from bench.decoders import DecoderConfig, traced_decoder

def decoder(tokens: int = 128) -> tuple[bytes, int]:
    return traced_decoder(DecoderConfig(8192, 64, 2, 2, tokens))
"""
REPO = Path(__file__).resolve().parents[2]


def _decoder(tokens: int = 128) -> bytes:
    return traced_decoder(DecoderConfig(8192, 64, 2, 2, tokens))[0]


def _ids(n: int, tokens: int = 128) -> CalibrationData:
    gen = torch.Generator().manual_seed(1)
    return CalibrationData(inputs=[torch.randint(0, 8192, (n, tokens), generator=gen)])


def test_a_sample_costs_at_least_its_output_twice_and_grows_with_the_sequence() -> None:
    short, long = load_model(_decoder(64)), load_model(_decoder(128))
    per_short = measure_sample(short, _ids(4, 64)).bytes_for("analysis")
    per_long = measure_sample(long, _ids(4, 128)).bytes_for("analysis")
    logits_bytes = 128 * 8192 * 4
    assert per_long >= 2 * logits_bytes  # its gradient and the loss's log-softmax
    assert 1.6 < per_long / per_short < 2.6  # linear in the tokens, as activations are


# The child builds the decoder, runs a whole job (analysis, quantization, one fine-tuning epoch,
# evaluation) with the budget given, and reports the plan and its peak resident memory.
_JOB = """
import json, sys
import torch
from mpq_core.data import CalibrationData
from mpq_core.intake import load_model
from mpq_core.memory_plan import measure_sample, status_bytes
from mpq_core.pipeline import run
from mpq_core.spec import FinetuneSpec, JobSpec

mode = sys.argv[1]
model = load_model(decoder()[0])
data = CalibrationData(inputs=[torch.randint(0, 8192, (96, 128), generator=torch.Generator().manual_seed(1))])
model_bytes = sum(p.numel() * p.element_size() for p in model.named_weights().values())
# Room for the stages' weight copies and 8 samples (the plan fills 90% of a budget): far
# below what a batch of 64 needs.
budget = int((status_bytes("VmRSS") + 12 * model_bytes + 8 * measure_sample(model, data).bytes_for() + 64 * 2**20) / 0.9)
spec = JobSpec(
    budgets=["avg-bits=4"],
    batch_size=64,
    max_memory=budget if mode == "planned" else None,
    finetune=FinetuneSpec(epochs=1, batch_size=64),
    device="cpu",
)
result = run(spec, model, data)
# The job resets the peak after each stage and reports each stage's own.
stages = result.report["memory"]["peak_bytes_by_stage"]
print(json.dumps({"budget": budget, "peak": max(status_bytes("VmHWM"), *stages.values()), "memory": result.report["memory"], "stages": sorted(stages)}))
"""


def _job(tmp_path: Path, mode: str) -> dict[str, Any]:
    script = tmp_path / "job.py"
    script.write_text(_DECODER + textwrap.dedent(_JOB))
    done = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow
def test_a_job_with_max_memory_stays_within_it_where_the_asked_batch_would_not(
    tmp_path: Path,
) -> None:
    planned = _job(tmp_path, "planned")
    plan = planned["memory"]
    assert plan["source"] == "max_memory" and plan["limited"]
    assert plan["batch_size"] < 64 and plan["finetune_batch_size"] < 64
    assert planned["peak"] <= planned["budget"], planned
    assert planned["stages"] == sorted(STAGES[:-1])  # every stage but export reports its peak
    # The same job at the asked batch of 64 does not fit that budget: the plan is what kept it.
    unplanned = _job(tmp_path, "machine")
    assert unplanned["memory"]["batch_size"] == 64
    assert unplanned["peak"] > planned["budget"], (unplanned, planned)


def test_a_budget_that_cannot_hold_one_sample_is_refused_with_what_to_set() -> None:
    model = load_model(torchscript_bytes(SmallMLP().eval(), (torch.randn(2, 16),)))
    data = CalibrationData(inputs=[torch.randn(8, 16)])
    with pytest.raises(SpecError) as err:
        plan_memory(
            model,
            data,
            batch_size=64,
            finetune_batch_size=None,
            bits=6,
            max_memory=2**26,
            device=torch.device("cpu"),
        )
    assert err.value.code == "max_memory_too_small"
    assert "set max_memory to at least" in str(err.value)


def test_a_budget_too_small_only_for_fine_tuning_says_so_and_what_would_do() -> None:
    # 128 MiB of weights: fine-tuning of several epochs keeps 6 copies (0.75 GiB) beside them
    # and the layer's float32 temporaries, the analysis at one width one layer's errors (about
    # 0.4 GiB) and a workspace.
    model = load_model(
        torchscript_bytes(torch.nn.Linear(8192, 4096).eval(), (torch.randn(2, 8192),))
    )
    data = CalibrationData(inputs=[torch.randn(8, 8192)])
    budget = int((status_bytes("VmRSS") + 800 * 2**20) / 0.9)

    def plan(finetune_batch_size: int | None) -> MemoryPlan:
        return plan_memory(
            model,
            data,
            batch_size=8,
            finetune_batch_size=finetune_batch_size,
            bits=1,
            max_memory=budget,
            device=torch.device("cpu"),
        )

    assert plan(None).batch_size >= 1  # enough without fine-tuning
    with pytest.raises(SpecError) as err:
        plan(8)
    message = str(err.value)
    assert err.value.code == "max_memory_too_small"
    assert "fine-tuning keeps 6 copies" in message and "the best state" in message
    assert "finetune.epochs 0" in message


def test_without_a_budget_the_plan_takes_the_process_memory_limit(tmp_path: Path) -> None:
    code = (
        "import resource, json\n"
        "from mpq_core.memory_plan import machine_memory, _rss\n"
        "import torch\n"
        "limit = _rss() + 2**30\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))\n"
        "print(json.dumps([limit, *machine_memory(torch.device('cpu'))]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    limit, budget, source = json.loads(done.stdout)
    assert budget == limit and "RLIMIT_DATA" in source
    # Here, without one, it is what the machine has.
    assert machine_memory(torch.device("cpu"))[0] > 2**28


@pytest.mark.parametrize(
    ("value", "expected"),
    [("8GB", 8 * 10**9), ("6 GiB", 6 * 2**30), (2**30, 2**30), (1.5e9, 1_500_000_000)],
)
def test_max_memory_reads_sizes_and_numbers(value: Any, expected: int) -> None:
    spec = JobSpec(budgets=["avg-bits=4"], max_memory=value)
    assert spec.max_memory == expected and spec.memory_budget == expected
    assert JobSpec.from_dict(spec.to_dict()).max_memory == expected


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("plenty", "invalid_spec"),
        ("8 parsecs", "invalid_spec"),
        (1000, "spec_out_of_range"),
        (float("inf"), "spec_not_finite"),
        (True, "spec_type"),
        ([8], "spec_type"),
    ],
)
def test_a_bad_max_memory_names_the_field(value: Any, code: str) -> None:
    with pytest.raises(SpecError) as err:
        JobSpec(budgets=["avg-bits=4"], max_memory=value)
    assert err.value.code == code and "max_memory" in str(err.value)
    with pytest.raises(SpecError) as direct:  # what `mpq analyze --max-memory` calls
        parse_max_memory(value)
    assert direct.value.code == code
