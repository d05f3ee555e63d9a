"""The whole product at LLM scale on this machine: time and peak memory of one forward+backward,
of ``analyze`` and of the whole job, on GPT-2-style decoders of 1M to 1B parameters.

Run::

    python -m bench.bench_scale --sizes 1m,10m --sequences 64
    python -m bench.bench_scale --sizes 125m --stages fwdbwd,analyze --timeout 7200
    python -m bench.bench_scale --sizes 1b --max-memory 20   # bfloat16: needs AVX512-BF16/AMX
    python -m bench.bench_scale --sizes '' --flat 10m     # analyze/job memory at 64, 256, 1024

Writes ``bench/results/scale.{json,md}``, merged with the rows already there (keyed by size and
number of sequences, stage by stage), so separate runs for different sizes accumulate. Long
running: not part of ``bench/run_all.py``.

Models: Hugging Face ``GPT2LMHeadModel`` built locally with random weights (token + learned
position embeddings, pre-LN blocks, MLP 4x, output head tied to the token embedding),
``use_cache=False``, wrapped to return ``.logits`` and traced to TorchScript as
``bench/bench_fisher_memory.py`` does:

=====  ======  =====  ======  =====  =========  ===========
size   vocab   width  blocks  heads  positions  parameters
=====  ======  =====  ======  =====  =========  ===========
1m     8192    96     2       4      128        1.02M
10m    8192    256    10      4      128        10.0M
125m   50257   768    12      12     1024       124M (GPT-2 small)
350m   50257   1024   24      16     1024       355M (GPT-2 medium)
1b     50257   2048   18      16     1024       1.01B, bfloat16
=====  ======  =====  ======  =====  =========  ===========

Data: ``--sequences`` (64) sequences of 128 random token ids, no labels (the label-free loss:
cross entropy against labels drawn from the model's own predictions).

Each measurement runs in a fresh subprocess, so its peak memory (``VmHWM`` of
``/proc/self/status``, read at the child's end) is its own:

1. ``fwdbwd``: one forward+backward over the sequences in batches of ``--batch-size``, with the
   loss the analysis uses (:class:`mpq_core.losses.PerSampleLoss`): the unit cost.
2. ``analyze``: :func:`mpq_core.sensitivity.analyze`, Fisher, default candidate bits.
3. ``job``: :func:`mpq_core.pipeline.quantize_model` with ``budgets=["avg-bits=4"]`` and one
   fine-tuning epoch, analysis and fine-tuning at ``--batch-size``, artefacts written.

Seconds are the work alone (after loading the model and data; the job's include its intake),
next to the child's wall time; ``x`` is the ratio to (1). ``--flat SIZE`` runs the stages at
64, 256 and 1024 sequences on one size: is peak memory flat in the number of sequences (the
goal of issue 10: within 10%)?

How long it takes (2 shared cores, load average 5-12, float32, 64 sequences, wall time): 1m all
stages about 4 minutes; 10m about 17 (the job alone 10); 125m fwd+bwd 7 minutes, analyze 15
(9.4 GiB: keep 12 GiB free); 350m one batch of 16 sequences fwd+bwd 9 minutes. ``--flat 1m``
takes over half an hour, and its job does not fit 24 GiB at 256 sequences (on main at 154e32b).
1b runs in bfloat16, which is practical only on a CPU with native bfloat16 (AVX512-BF16 or AMX,
``lscpu``): with AMX a 1024x1024 bfloat16 matmul runs at about 1 TFLOP/s, 15x float32, and 1b's
fwd+bwd of 64 sequences takes under 2 minutes; on a CPU without, one 2048x2048x8192 bfloat16
matmul ran over 9 minutes (5.5 s in float32), so one batch would take days.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKENS = 128
STAGES = ("fwdbwd", "analyze", "job")
FLAT_SEQUENCES = (64, 256, 1024)
MARK = "BENCH_SCALE_RESULT "  # prefixes the child's JSON line among whatever else it prints
GIB = 1024**3


@dataclass(frozen=True)
class Size:
    """One decoder configuration."""

    vocab: int
    width: int
    layers: int
    heads: int
    positions: int
    dtype: str = "float32"


SIZES: dict[str, Size] = {
    "1m": Size(8192, 96, 2, 4, TOKENS),
    "10m": Size(8192, 256, 10, 4, TOKENS),
    "125m": Size(50257, 768, 12, 12, 1024),
    "350m": Size(50257, 1024, 24, 16, 1024),
    "1b": Size(50257, 2048, 18, 16, 1024, "bfloat16"),
}


# --- the children: each measurement in its own process ----------------------------------------


def _peak_gib() -> float:
    """This process's peak resident memory (``VmHWM``)."""
    from mpq_core.memory_plan import status_bytes

    peak = status_bytes("VmHWM")
    return -1.0 if peak is None else peak / GIB


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(size: Size, folder: Path) -> dict[str, Any]:
    """Build the decoder with random weights and save it as TorchScript in ``folder``."""
    import torch

    from bench.decoders import DecoderConfig, traced_decoder

    cfg = DecoderConfig(
        size.vocab, size.width, size.layers, size.heads, size.positions, getattr(torch, size.dtype)
    )
    archive, params = traced_decoder(cfg, tokens=TOKENS)  # the tied head counted once
    (folder / "model.pt").write_bytes(archive)
    return {"params": params}


def fwdbwd(folder: Path, data_path: Path, batch_size: int) -> dict[str, Any]:
    """One forward+backward over the data in batches, with the analysis's label-free loss."""

    from mpq_core.data import load_data
    from mpq_core.intake import load_model
    from mpq_core.losses import PerSampleLoss

    model, data = load_model(folder / "model.pt"), load_data(data_path)
    loss_fn = PerSampleLoss("ce")
    start, cpu = time.perf_counter(), _cpu_s()
    for k, batch in enumerate(data.batches(batch_size)):
        out = model(*batch.inputs)
        loss_fn(out, loss_fn.targets(out, None, k * batch_size)).sum().backward()
        for p in model.module.parameters():
            p.grad = None  # as the analysis does: no gradient kept from batch to batch
        del out
    return {"seconds": time.perf_counter() - start, "work_cpu_s": _cpu_s() - cpu, "batches": k + 1}


def analyze_stage(
    folder: Path, data_path: Path, batch_size: int, max_memory_gib: float | None = None
) -> dict[str, Any]:
    """Fisher sensitivities at the default candidate bits; with ``max_memory_gib``, at the
    batch size mpq's memory plan picks for that budget (as ``mpq analyze --max-memory``)."""
    import torch

    from mpq_core.data import load_data
    from mpq_core.intake import load_model
    from mpq_core.memory_plan import plan_memory
    from mpq_core.sensitivity import analyze
    from mpq_core.spec import DEFAULT_BITS, AnalysisSpec

    model, data = load_model(folder / "model.pt"), load_data(data_path)
    start, cpu = time.perf_counter(), _cpu_s()
    if max_memory_gib is not None:
        batch_size = plan_memory(
            model,
            data,
            batch_size=batch_size,
            finetune_batch_size=None,
            bits=len(DEFAULT_BITS),
            max_memory=int(max_memory_gib * GIB),
            device=torch.device("cpu"),
        ).batch_size
    table = analyze(model, data, AnalysisSpec(), batch_size=batch_size)
    seconds, work_cpu = time.perf_counter() - start, _cpu_s() - cpu
    return {
        "seconds": seconds,
        "work_cpu_s": work_cpu,
        "layers": len(table.layers),
        "planned_batch": batch_size,
    }


def job(
    folder: Path, data_path: Path, batch_size: int, max_memory_gib: float | None = None
) -> dict[str, Any]:
    """The whole job, artefacts included, with one fine-tuning epoch (under ``max_memory_gib``
    when given: the job's memory plan then picks the batch sizes)."""
    from mpq_core.pipeline import quantize_model
    from mpq_core.spec import FinetuneSpec, JobSpec

    spec = JobSpec(
        budgets=["avg-bits=4"],
        batch_size=batch_size,
        device="cpu",
        finetune=FinetuneSpec(epochs=1, batch_size=batch_size),
        max_memory=None if max_memory_gib is None else int(max_memory_gib * GIB),
    )
    out = Path(tempfile.mkdtemp(dir=folder, prefix="job-"))
    start, cpu = time.perf_counter(), _cpu_s()
    result = quantize_model(folder / "model.pt", data_path, spec, out)
    seconds, work_cpu = time.perf_counter() - start, _cpu_s() - cpu
    shutil.rmtree(out, ignore_errors=True)
    timings = {k: round(v, 2) for k, v in result.report.get("timings", {}).items()}
    plan = result.report.get("memory") or {}
    # The job resets the process's peak after each stage and reports each stage's own.
    stage_peaks = plan.get("peak_bytes_by_stage") or {}
    return {
        "stage_peak_gib": {k: round(v / GIB, 3) for k, v in stage_peaks.items()},
        "seconds": seconds,
        "work_cpu_s": work_cpu,
        "stage_seconds": timings,
        "planned_batch": plan.get("batch_size"),
        "planned_finetune_batch": plan.get("finetune_batch_size"),
    }


def limit_memory(gib: float | None) -> float | None:
    """Cap this process's address space at ``gib`` GiB (``None``: the memory available now;
    0: no cap). A stage that outgrows the machine then fails here with a memory error instead
    of waking the kernel's OOM killer, which may pick another process: the machine is shared."""
    if gib is None:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                gib = int(line.split()[1]) * 1024 / GIB
    if not gib:
        return None
    cap = int(gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return round(gib, 2)


def _stage(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir)
    data_path = folder / f"data_{args.sequences}.npz"
    if args.child == "build":
        return build(SIZES[args.size], folder)
    if args.child == "fwdbwd":
        return fwdbwd(folder, data_path, args.batch_size)
    if args.child == "analyze":
        return analyze_stage(folder, data_path, args.batch_size, args.max_memory)
    return job(folder, data_path, args.batch_size, args.max_memory)


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print its JSON line (with the peak memory) for the parent."""
    cap = limit_memory(args.memory_limit)
    try:
        out = _stage(args)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "can't allocate memory" not in str(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        sys.exit(
            f"can't allocate memory: {first} (address space capped at {cap} GiB, what was "
            f"available when the child started; peak resident {_peak_gib():.2f} GiB)"
        )
    out["memory_limit_gib"] = cap
    out["peak_gib"] = max([_peak_gib(), *out.get("stage_peak_gib", {}).values()])
    # The machine may be shared: CPU seconds next to wall seconds show how much of the time
    # this child actually ran, and the load average what else was running.
    out["cpu_s"] = round(_cpu_s(), 2)
    if "work_cpu_s" in out:
        out["work_cpu_s"] = round(out["work_cpu_s"], 2)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(MARK + json.dumps(out), flush=True)


# --- the parent: building, running the children, collecting -----------------------------------


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    """Why a child gave no result, in one line."""
    code = proc.returncode
    if code < 0 and -code == signal.SIGABRT and "bad_alloc" in proc.stderr:
        return "out of memory: std::bad_alloc"
    if code < 0 and -code == signal.SIGKILL:
        return "killed by SIGKILL (the OOM killer or a memory limit)"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1][:300] if lines else f"exit status {code}"
    if "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr:
        return f"out of memory: {last}"
    return last


def run_child(stage: str, size: str, folder: Path, sequences: int, args: Any) -> dict[str, Any]:
    """One child process; its JSON result with its wall time, or ``{"error": ...}``."""
    cmd = [
        sys.executable, "-m", "bench.bench_scale", "--child", stage, "--size", size,
        "--dir", str(folder), "--sequences", str(sequences), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if getattr(args, "memory_limit", None) is not None:
        cmd += ["--memory-limit", str(args.memory_limit)]
    if getattr(args, "max_memory", None) is not None:
        cmd += ["--max-memory", str(args.max_memory)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child
        return {"error": f"timeout after {args.timeout} s", "wall_s": args.timeout}
    wall = round(time.perf_counter() - start, 2)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            out: dict[str, Any] = json.loads(line[len(MARK) :])
            out["seconds"] = round(out["seconds"], 2) if "seconds" in out else None
            out["peak_gib"] = round(out["peak_gib"], 3)
            return {**out, "wall_s": wall}
    return {"error": _failure(proc), "wall_s": wall}


def write_data(folder: Path, vocab: int, sequences: int) -> None:
    """``sequences`` x 128 random token ids as ``data_{sequences}.npz`` (key ``input``, int64)."""
    path = folder / f"data_{sequences}.npz"
    if not path.exists():
        ids = np.random.default_rng(0).integers(0, vocab, (sequences, TOKENS), dtype=np.int64)
        np.savez(path, input=ids)


def ensure_model(size: str, folder: Path, args: Any) -> dict[str, Any]:
    """Build the size's model once into ``folder`` (reused across stages and sequence counts)."""
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return meta
    folder.mkdir(parents=True, exist_ok=True)
    meta = run_child("build", size, folder, 0, args)
    if "error" not in meta:
        meta_path.write_text(json.dumps(meta))
    return meta


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _commit() -> str:
    """HEAD, and the last commit that changed the engine (what the numbers depend on)."""
    engine = _git("log", "-1", "--format=%H", "--", "mpq_core")
    return f"{_git('rev-parse', 'HEAD')} (engine {engine})"


def _bf16_flags() -> list[str]:
    """The CPU's native bfloat16 instructions (``/proc/cpuinfo`` flags): without them a
    bfloat16 model runs orders of magnitude slower than in float32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "bf16_instructions": _bf16_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def measure(size: str, sequences: int, stages: list[str], args: Any) -> dict[str, Any]:
    """Every requested stage of one size at one number of sequences: the row for the results."""
    folder = Path(args.workdir) / size
    meta = ensure_model(size, folder, args)
    row: dict[str, Any] = {
        "size": size,
        "config": asdict(SIZES[size]),
        "params": meta.get("params"),
        "sequences": sequences,
        "tokens": TOKENS,
        "batch_size": args.batch_size,
        "stages": {},
    }
    if "error" in meta:
        # A model that could not be built is a result too: no stage of it could run.
        failed = {"error": f"build: {meta['error']}", "commit": args.commit}
        row["stages"] = {stage: failed for stage in stages or ["fwdbwd"]}
        return row
    row["build"] = meta
    write_data(folder, SIZES[size].vocab, sequences)
    stamp = {"commit": args.commit, "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")}
    for stage in stages:
        print(f"[bench_scale] {size} x {sequences} sequences: {stage} ...", flush=True)
        row["stages"][stage] = {**run_child(stage, size, folder, sequences, args), **stamp}
        print(f"[bench_scale]   {json.dumps(row['stages'][stage])}", flush=True)
    return row


# --- results -----------------------------------------------------------------------------------


def merge(old: dict[str, Any], rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The stored results with ``rows`` merged in, stage by stage, by size and sequences."""
    runs: dict[str, Any] = dict(old.get("runs", {}))
    for row in rows:
        key = f"{row['size']}@{row['sequences']}"
        stages = {**runs.get(key, {}).get("stages", {}), **row["stages"]}
        runs[key] = {**runs.get(key, {}), **row, "stages": stages}
    return {**old, **info, "runs": runs}  # other keys (e.g. hand-written "notes") stay


def _cell(stage: dict[str, Any] | None, unit: dict[str, Any] | None, what: str) -> str:
    if stage is None:
        return ""
    if "error" in stage:
        return _short(stage["error"]) if what == "s" else "-"  # said once, in seconds
    if what == "peak":
        return f"{stage['peak_gib']:.2f}"
    text = f"{stage['seconds']:.1f}"
    if unit and unit.get("seconds"):
        text += f" ({stage['seconds'] / unit['seconds']:.1f}x)"
    return text


def _short(error: str) -> str:
    """An error as a table cell; scale.json keeps the whole message."""
    if "SIGKILL" in error:
        return "killed (OOM killer?)"
    peak = re.search(r"capped at ([\d.]+) GiB.*peak resident ([\d.]+) GiB", error)
    if error.startswith("out of memory") and peak:
        return f"out of memory at {peak[2]} GiB (cap {peak[1]})"
    return error if len(error) <= 60 else error[:57] + "..."


def _cpu_cell(stage: dict[str, Any]) -> str:
    if "work_cpu_s" in stage:
        return f"{stage['work_cpu_s']:.1f}"
    return f"{stage['cpu_s']:.1f}*" if "cpu_s" in stage else "-"


def _ordered(runs: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(runs.values(), key=lambda r: (r.get("params") or 0, r["sequences"]))


def main_table(runs: dict[str, Any]) -> list[str]:
    lines = [
        "| model | params | dtype | sequences | fwd+bwd s | analyze s (x) | job s (x) "
        "| peak GiB fwd+bwd | peak GiB analyze | peak GiB job | CPU s | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in _ordered(runs):
        st = row["stages"]
        unit = st.get("fwdbwd")
        cells = [_cell(st.get(s), unit if s != "fwdbwd" else None, "s") for s in STAGES]
        peaks = [_cell(st.get(s), None, "peak") for s in STAGES]
        # CPU seconds and the machine's load: how much of the wall time each child really ran.
        cpu = " / ".join(_cpu_cell(st[s]) for s in STAGES if s in st)
        load = " / ".join(str(st[s].get("load_avg_1m", "-")) for s in STAGES if s in st)
        params = f"{row['params'] / 1e6:.1f}M" if row.get("params") else "?"
        lines.append(
            f"| {row['size']} | {params} | {row['config']['dtype']} | {row['sequences']} | "
            + " | ".join([*cells, *peaks, cpu, load])
            + " |"
        )
    return lines


def flat_table(runs: dict[str, Any]) -> list[str]:
    """Peak memory against the number of sequences, for sizes measured at several counts."""
    lines = []
    by_size: dict[str, list[dict[str, Any]]] = {}
    for row in _ordered(runs):
        by_size.setdefault(row["size"], []).append(row)
    for size, rows in by_size.items():
        if len(rows) < 2:
            continue
        base = rows[0]["stages"]
        for row in rows:
            cells = []
            for stage in ("analyze", "job"):
                now, first = row["stages"].get(stage), base.get(stage)
                if now is None or "error" in now:
                    cells.append(_cell(now, None, "s"))  # empty, or the error
                elif first and "peak_gib" in first:
                    cells.append(
                        f"{now['peak_gib']:.2f} ({now['peak_gib'] / first['peak_gib']:.2f}x)"
                    )
                else:
                    cells.append(f"{now['peak_gib']:.2f}")
            lines.append(f"| {size} | {row['sequences']} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "",
        "Peak memory against the number of sequences (x: against the fewest; goal within 10%):",
        "",
        "| model | sequences | analyze peak GiB (x) | job peak GiB (x) |",
        "|---|---:|---:|---:|",
        *lines,
    ]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = [
        "# The whole product at LLM scale",
        "",
        f"Generated by `python -m bench.bench_scale` (last run {result['when']}, commit "
        f"`{result['commit']}`) on {m['cores']} CPU cores, torch {m['torch']}. GPT-2-style "
        f"decoders with random weights, {TOKENS}-token sequences of random ids, no labels; batch "
        "size as in `batch_size` of each row of scale.json. Seconds are the work after loading; "
        "x is the ratio to one forward+backward over the same sequences; peak is the child "
        "process's VmHWM. CPU s (user+system, both threads, of the timed work; with * of the "
        "whole child, imports and loading included) and the 1-minute load average at the "
        "child's end are per stage: on a shared machine, wall seconds far above half the CPU "
        "seconds mean the child waited for a core. Each stage's commit is in scale.json.",
        "",
    ]
    notes = [f"- {note}" for note in result.get("notes", [])]
    tables = main_table(result["runs"]) + flat_table(result["runs"])
    return "\n".join(head + tables + (["", "Notes:", "", *notes] if notes else [])) + "\n"


def save(rows: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    info = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "machine": machine(),
    }
    if not rows and old:  # only re-rendering the table: the last run's stamp stays
        info = {k: old[k] for k in info}
    result = merge(old, rows, info)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / "scale.md").write_text(md)
    print(md)
    return result


# --- command line -------------------------------------------------------------------------------


def _names(text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)}; use {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="1m,10m", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--sequences", type=int, default=64, help="calibration sequences")
    p.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated: " + ",".join(STAGES)
    )
    p.add_argument("--flat", default=None, metavar="SIZE", help="also run SIZE at 64/256/1024")
    p.add_argument("--flat-sequences", default=",".join(map(str, FLAT_SEQUENCES)))
    p.add_argument("--batch-size", type=int, default=16, help="analysis and fine-tuning batch")
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="the job's max_memory (analyze: the same plan): batch sizes chosen to fit",
    )
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    p.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GIB",
        help="cap each child's address space (default: the memory available at its start; 0: "
        "none), so a stage too big for the machine fails alone, recorded as out of memory",
    )
    p.add_argument("--workdir", default=None, help="keep the built models here (reused)")
    p.add_argument("--no-save", action="store_true", help="print, do not write bench/results")
    p.add_argument("--child", choices=("build", *STAGES), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    sizes = _names(args.sizes, list(SIZES), "size")
    stages = _names(args.stages, STAGES, "stage")
    plan = [(size, args.sequences) for size in sizes]
    if args.flat:
        flat = _names(args.flat, list(SIZES), "size")[0]
        plan += [(flat, int(n)) for n in args.flat_sequences.split(",")]
    plan = list(dict.fromkeys(plan))  # --sizes 10m --flat 10m measures 10m at 64 once
    args.commit = _commit()
    temporary = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    try:
        rows = [measure(size, n, stages, args) for size, n in plan]
    finally:
        if temporary:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.no_save:
        print(json.dumps(rows, indent=2))
        return {"rows": rows}
    return save(rows, args)


if __name__ == "__main__":
    main()
