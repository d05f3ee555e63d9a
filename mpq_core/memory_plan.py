"""Batch sizes chosen from a memory budget, so a large model runs where it fits.

Every pass of a job (profiling, the Fisher analysis, activation calibration, evaluation,
fine-tuning) holds the model, what the stage keeps beside it (gradients, master weights, the
optimiser's moments) and one batch's autograd graph. The first two do not depend on the batch;
the graph grows linearly with it. So the plan measures the graph of a sample directly: one
forward pass at two batch sizes, summing the bytes autograd saves for the backward pass (every
saved tensor goes through ``saved_tensors_hooks``, TorchScript and torch.export alike) and the
output, whose gradient and softmax the loss adds. The slope is the cost of one sample; the
largest batch whose graph fits beside the fixed part is the batch size, never above the spec's.

Layers are not split into groups: the Fisher pass contracts each op's output gradient as the
backward pass delivers it (``sensitivity/fisher.py``), so beyond the graph a pass holds one
layer's statistics at a time, and a group of layers would need the same whole-model graph.

The budget is the spec's ``max_memory`` or, without one, what the machine gives this process:
the memory available now plus what the process already holds, capped by its ``RLIMIT_DATA`` /
``RLIMIT_AS`` (the worker's sandbox sets one) and its cgroup's memory limit (v2 or v1); on a GPU, the
device's free memory plus what PyTorch already reserved.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpq_core.capture import capture_context
from mpq_core.data import CalibrationData
from mpq_core.errors import SpecError
from mpq_core.host_memory import cgroup_memory_limit
from mpq_core.intake import LoadedModel, select_output
from mpq_core.runner import iter_batches
from mpq_core.sensitivity.fisher import WORKSPACE_BYTES

__all__ = [
    "MemoryPlan",
    "SampleCost",
    "machine_memory",
    "measure_sample",
    "peak_resident_and_reset",
    "plan_memory",
    "release_free_memory",
    "status_bytes",
]

# What a sample costs beyond what autograd saves, in copies of its output: in the analysis, the
# output's gradient and the loss's log-softmax; in fine-tuning also the teacher's output and the
# distillation loss's log-softmaxes, probabilities and differences, and their gradients.
_OUTPUT_COPIES = {"analysis": 2, "finetune": 10}
# Headroom for what the estimate does not see: the allocator's fragmentation, temporaries of
# single ops (a matmul's output before it is saved), the Python objects of the graph.
_HEADROOM = 1.25
# Copies of the model's weights a stage holds beside the model itself: the analysis, the
# weight gradients of its backward pass; evaluation, the float weights it compares against;
# fine-tuning, those float weights (its teacher), the master weights, Adam's two moments and
# the gradients, plus the best state so far where more than one epoch can run
# (``_BEST_STATE``). The teacher is swapped in by reference and the gradients move from the
# parameters to the masters, so neither is copied again (``finetune.py``).
_MODEL_COPIES = {"analysis": 1, "evaluation": 1, "finetune": 5}
_BEST_STATE = 1
# Float32 temporaries of the largest layer while fine-tuning loads or masks it: its rows and
# their quantized values (``fake_quantize_on``), the mask's comparison.
_FINETUNE_LAYER_COPIES = 3
# The share of the budget the plan fills: what the estimate misses (single ops' temporaries on
# the largest layers, the allocator) must fit in the rest. Measured at 125M under 8 GiB with the
# whole budget planned: fine-tuning peaked at 8.24 GiB, 3% over.
_PLANNED_SHARE = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    """The batch sizes a job runs with and why (recorded in ``report.json``)."""

    max_memory: int  # bytes the job may hold
    source: str  # where the budget came from
    per_sample: int  # estimated bytes one sample adds to the analysis's forward and backward
    per_finetune_sample: int  # the same in fine-tuning (the distillation loss's copies)
    resident: int  # bytes the process held when the plan was made (libraries, model, data)
    model_bytes: int
    batch_size: int  # profiling, analysis, calibration and evaluation
    finetune_batch_size: int  # fine-tuning's micro-batch; 0 when the job does not fine-tune
    asked_batch_size: int
    asked_finetune_batch_size: int

    @property
    def limited(self) -> bool:
        """Whether the budget lowered a batch size below the spec's."""
        return (
            self.batch_size < self.asked_batch_size
            or self.finetune_batch_size < self.asked_finetune_batch_size
        )

    def note(self) -> str | None:
        """What the user should know when the budget chose smaller batches than asked."""
        if not self.limited:
            return None
        tuned = (
            f" (fine-tuning steps of {self.asked_finetune_batch_size} run as micro-batches of "
            f"{self.finetune_batch_size}, gradients accumulated)"
            if self.finetune_batch_size < self.asked_finetune_batch_size
            else ""
        )
        return (
            f"batch size {self.batch_size} instead of {self.asked_batch_size}{tuned} to stay "
            f"within "
            f"{_gib(self.max_memory)} ({self.source}): one sample's forward and backward pass "
            f"takes about {_mib(self.per_sample)}; results do not depend on these sizes"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "limited": self.limited}


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's ``malloc_trim``).

    PyTorch's CPU tensors come from malloc, and glibc keeps freed blocks in its arenas: after a
    stage's batches are gone the process's resident size stays at that stage's peak, so the
    next stage starts above the plan's baseline (measured: +170 MiB between the analysis and
    fine-tuning of a small decoder). A no-op where the C library has no ``malloc_trim``.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def status_bytes(field: str) -> int | None:
    """A size field of this process's ``/proc/self/status`` in bytes (``VmRSS``: resident now,
    ``VmHWM``: peak resident); None where ``/proc`` does not tell."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    prefix = f"{field}:"
    for line in status.splitlines():
        if line.startswith(prefix):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def peak_resident_and_reset() -> int | None:
    """This process's peak resident bytes since the last reset (``VmHWM``), then a reset, so
    each stage of a job reports its own peak. None where ``/proc`` does not tell."""
    peak = status_bytes("VmHWM")
    # 5 resets the peak resident size; where refused, each stage reports the job's peak so far.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _rss() -> int:
    return status_bytes("VmRSS") or 0


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_memory(device: torch.device) -> tuple[int, str]:
    """The bytes this process may hold in total on ``device``, and where the number came from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device), f"free memory of {device}"
    limits: list[tuple[int, str]] = []
    available = _meminfo_available()
    if available is not None:
        limits.append((available + _rss(), "the machine's available memory"))
    for which, name in ((resource.RLIMIT_DATA, "RLIMIT_DATA"), (resource.RLIMIT_AS, "RLIMIT_AS")):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, f"the process's {name} limit"))
    cgroup = cgroup_memory_limit()
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    if not limits:
        return 2**40, "no limit found"
    return min(limits)


def _graph_bytes(
    model: LoadedModel, data: CalibrationData, k: int, output_key: Any
) -> tuple[int, int]:
    """Bytes autograd saves for the backward pass of a batch of ``k`` samples (parameters,
    which the model holds anyway, not counted), and the bytes of its output."""
    params = {p.untyped_storage().data_ptr() for p in model.named_weights().values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.device.type != "meta" and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch = next(iter_batches(model, data.subset(slice(0, k)), k))  # padded to a fixed batch
    with capture_context(grad=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = select_output(model(*batch.inputs), output_key)
    return sum(saved.values()), out.numel() * out.element_size()


@dataclass(frozen=True)
class SampleCost:
    """What one sample adds to a forward and backward pass, measured once per job."""

    saved: float  # bytes autograd saves for the backward pass
    output: float  # bytes of the sample's output

    def bytes_for(self, stage: str = "analysis") -> int:
        """Estimated bytes a sample of ``stage`` (``analysis`` or ``finetune``) takes, with
        headroom: what autograd saves, and the stage's copies of the output."""
        return int(_HEADROOM * max(self.saved + _OUTPUT_COPIES[stage] * self.output, 1))


def measure_sample(model: LoadedModel, data: CalibrationData, output_key: Any = None) -> SampleCost:
    """One sample's graph and output bytes, as the difference between batches of 2 and 1 (what
    the batch shares, such as a position table, cancels out); a model exported for a fixed
    batch is measured at that size."""
    if model.fixed_batch:
        k = model.fixed_batch
        saved, out = _graph_bytes(model, data, k, output_key)
        return SampleCost(saved / k, out / k)
    saved, out = _graph_bytes(model, data, 1, output_key)
    if data.num_samples >= 2:
        saved2, out2 = _graph_bytes(model, data, 2, output_key)
        saved, out = saved2 - saved, out2 - out
    return SampleCost(saved, out)


def _fit(budget: int, fixed: int, per_sample: int, asked: int) -> int:
    return max(0, min(asked, (budget - fixed) // max(per_sample, 1)))


def _too_small(
    budget: int, analysing: int, tuning: int, copies: int, model_bytes: int
) -> SpecError:
    """The refusal of a budget the user set: what does not fit, and what would.

    Args:
        analysing: bytes the analysis needs with one sample.
        tuning: bytes fine-tuning needs with one sample when that is what does not fit, else 0.
        copies: the copies of the weights fine-tuning keeps beside the model.
    """
    need = int(max(analysing, tuning) / _PLANNED_SHARE)
    if tuning:
        what = (
            f"fine-tuning keeps {copies} copies of the {_gib(model_bytes)} of weights (the "
            f"float weights it distils from, masters, Adam's moments, gradients"
            f"{', the best state' if copies > _MODEL_COPIES['finetune'] else ''}) beside the "
            f"model, {_gib(tuning)} with one sample's pass; without fine-tuning "
            f"(finetune.epochs 0) the job needs {_gib(int(analysing / _PLANNED_SHARE))}"
        )
    else:
        what = f"the model, one layer's quantization errors and one sample take {_gib(analysing)}"
    return SpecError(
        f"max_memory {_gib(budget)} cannot hold this job: {what}; set max_memory to at least "
        f"{_gib(need)}",
        code="max_memory_too_small",
    )


def plan_memory(
    model: LoadedModel,
    data: CalibrationData,
    *,
    batch_size: int,
    finetune_batch_size: int | None,
    finetune_keeps_best: bool = True,
    bits: int,
    max_memory: int | None,
    device: torch.device,
    output_key: Any = None,
) -> MemoryPlan:
    """The batch sizes that keep a job within ``max_memory`` (None: what the machine gives).

    Args:
        model: the loaded model, on ``device``.
        data: the calibration data (a sample or two are run).
        batch_size, finetune_batch_size: what the spec asks for (upper bounds); None when the
            job does not fine-tune.
        finetune_keeps_best: whether fine-tuning may run more than one epoch, and so keep a
            copy of its best state while it trains on.
        bits: how many candidate widths the analysis scores (one layer's error stack each).
        max_memory: the budget in bytes.
        device: where the job runs.
        output_key: which output the loss scores.

    Raises:
        SpecError: ``max_memory_too_small`` when a budget the user set cannot hold one sample.
    """
    if max_memory is None:
        budget, source = machine_memory(device)
    else:
        budget, source = max_memory, "max_memory"
    usable = int(budget * _PLANNED_SHARE)
    cost = measure_sample(model, data, output_key)  # one measurement serves every stage
    per_sample = cost.bytes_for("analysis")
    per_tuned = cost.bytes_for("finetune") if finetune_batch_size else 0
    weights = list(model.named_weights().values())
    model_bytes = sum(p.numel() * p.element_size() for p in weights)
    codes = sum(p.numel() for p in weights)  # the quantized layers' int8 codes, from quantize on
    largest = max((p.numel() for p in weights), default=0)
    resident = _rss() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    # One layer's quantization errors at every width, in float32, and the two float32 copies
    # of the layer they are rebuilt from (its rows, one width's quantized rows); the
    # contraction's own workspace.
    errors = (bits + 2) * largest * 4 + WORKSPACE_BYTES
    tuning_copies = _MODEL_COPIES["finetune"] + (_BEST_STATE if finetune_keeps_best else 0)
    fixed = {
        "analysis": resident + _MODEL_COPIES["analysis"] * model_bytes + errors,
        "evaluation": resident + _MODEL_COPIES["evaluation"] * model_bytes + codes,
        "finetune": resident
        + tuning_copies * model_bytes
        + codes
        + _FINETUNE_LAYER_COPIES * largest * 4,
    }
    analysis = min(
        _fit(usable, fixed["analysis"], per_sample, batch_size),
        _fit(usable, fixed["evaluation"], per_sample, batch_size),
    )
    asked_finetune = finetune_batch_size or 0
    finetune = _fit(usable, fixed["finetune"], per_tuned, asked_finetune)
    if (analysis < 1 or (asked_finetune and finetune < 1)) and max_memory is not None:
        analysing = fixed["analysis"] + per_sample
        tuning = fixed["finetune"] + per_tuned if asked_finetune and finetune < 1 else 0
        raise _too_small(budget, analysing, tuning, tuning_copies, model_bytes)
    return MemoryPlan(
        max_memory=budget,
        source=source,
        per_sample=per_sample,
        per_finetune_sample=per_tuned,
        resident=resident,
        model_bytes=model_bytes,
        batch_size=max(1, analysis),
        finetune_batch_size=max(1, finetune) if asked_finetune else 0,
        asked_batch_size=batch_size,
        asked_finetune_batch_size=asked_finetune,
    )
