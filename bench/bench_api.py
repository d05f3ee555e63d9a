"""Benchmark of the REST API under concurrent clients, and of its memory during big uploads.

Run: ``python -m bench.bench_api``. Writes ``bench/results/api.{json,md}``.

Everything runs on 127.0.0.1 against real ``uvicorn --factory api.app:create_app`` subprocesses
(one worker) on the embedded default: a fresh SQLite database migrated with
``python -m mpq_service.migrate upgrade``, local storage and the filesystem broker under a temporary
``MPQ_DATA_DIR``. No Celery worker runs, so created jobs stay queued; ``POST /v1/jobs`` still
sends the Celery task to the filesystem broker. The benchmark process makes the API key
(:func:`api.auth.create_key` on the same database), a tiny TorchScript model (torch, here only)
and a calibration ``.npz``, and uploads both once.

1. Load: ``N`` in 1, 8, 32 concurrent clients (asyncio, one ``httpx.AsyncClient`` and one
   keep-alive connection each), a fixed number of requests per phase (capped in time): ``GET
   /healthz`` (the baseline: no auth, no database), ``POST /v1/jobs``, ``GET /v1/jobs/{id}``
   polls (round-robin over the jobs just created) and ``GET /v1/jobs?limit=20`` history.
   Requests/s, p50/p99 latency, errors, and the CPU time the API process and this process spent
   per request (both compete for this machine's CPUs, so a phase can be client-bound).
2. Memory: a 500 MiB body, generated on the fly in 1 MiB chunks (the first one starts with the
   real TorchScript archive so the sniffer accepts it, the rest is padding; one padding buffer
   reused, never the whole body), streamed (chunked) to ``POST /v1/models`` while the API
   process's ``VmRSS``/``VmHWM`` (``/proc/<pid>/status``) are sampled every 50 ms. Then the
   same body against a second API with ``MPQ_MAX_UPLOAD_BYTES`` = 100 MiB: refused mid-stream
   (413); time to refusal and memory, over a raw socket so the 413 is seen while still sending.
   Also the same with a declared ``Content-Length`` (refused before the body is read).

The memory test runs before the load phases, on a warmed-up process, so ``VmHWM`` before it is
the process's peak so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.files import mlp_data_npz
from tests.support.processes import ServiceProcess, start_http_service

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

MiB = 1024 * 1024
PEPPER = "bench-pepper"
CONCURRENCY = (1, 8, 32)
REQUESTS_PER_PHASE = 300
PHASE_CAP_S = 20.0
LOAD_BUDGET_S = 170.0  # phases not started by then are skipped (keeps the run under 4 minutes)
BIG_UPLOAD_BYTES = 500 * MiB
BIG_LIMIT_BYTES = 1024 * MiB
SMALL_LIMIT_BYTES = 100 * MiB
SAMPLE_INTERVAL_S = 0.05
SPEC: dict[str, Any] = {"budgets": ["avg-bits=4"], "bits": [2, 4, 8], "finetune": {"epochs": 0}}
ENDPOINTS = ("healthz", "create_job", "poll_job", "list_jobs")
ENDPOINT_LABELS = {
    "healthz": "GET /healthz (baseline)",
    "create_job": "POST /v1/jobs",
    "poll_job": "GET /v1/jobs/{id}",
    "list_jobs": "GET /v1/jobs?limit=20",
}


# --- the API subprocess ---------------------------------------------------------------------


def service_env(data_dir: Path, max_upload_bytes: int) -> dict[str, str]:
    """The process environment of the embedded default under ``data_dir`` (no inherited MPQ_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env.update(
        MPQ_DATA_DIR=str(data_dir),
        MPQ_DATABASE_URL=f"sqlite:///{data_dir / 'mpq.db'}",
        MPQ_API_KEY_PEPPER=PEPPER,
        MPQ_MAX_UPLOAD_BYTES=str(max_upload_bytes),
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Server:
    """A running ``uvicorn`` API process."""

    proc: ServiceProcess
    base_url: str
    data_dir: Path
    api_key: str = ""

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def stop(self) -> None:
        self.proc.stop()


def create_api_key(data_dir: Path) -> str:
    """A fresh API key of tenant ``bench`` in the service's database."""
    from api.auth import create_key
    from mpq_service.db import make_engine, make_sessionmaker, session_scope

    engine = make_engine(f"sqlite:///{data_dir / 'mpq.db'}")
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            return create_key(session, "bench", "bench", pepper=PEPPER)
    finally:
        engine.dispose()


def start_server(data_dir: Path, max_upload_bytes: int, timeout_s: float = 30.0) -> Server:
    """Migrate a fresh database under ``data_dir``, make a key, start uvicorn, wait for healthz."""
    env = service_env(data_dir, max_upload_bytes)
    subprocess.run(
        [sys.executable, "-m", "mpq_service.migrate", "upgrade"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    api_key = create_api_key(data_dir)

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip

    proc, base_url = start_http_service(
        "uvicorn", command, env=env, cwd=ROOT, log_path=data_dir.parent / "uvicorn.log",
        ready_path="/healthz", timeout_s=timeout_s,
    )  # fmt: skip
    return Server(proc, base_url, data_dir, api_key)


def proc_memory_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of process ``pid`` in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class RssSampler:
    """Samples ``(t, VmRSS KiB, VmHWM KiB)`` of a process every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                rss, hwm = proc_memory_kib(self.pid)
                self.samples.append((time.perf_counter(), rss, hwm))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


# --- test files -----------------------------------------------------------------------------


def torchscript_model_bytes() -> bytes:
    """A tiny scripted MLP saved with ``torch.jit.save`` (torch is imported here only)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def big_body_chunks(head: bytes, total: int, chunk: int = MiB) -> Iterator[bytes]:
    """``total`` bytes in ``chunk``-sized pieces: ``head``, then padding (one reused buffer)."""
    pad = bytes(range(256)) * (chunk // 256)
    first = (head + pad)[:chunk]
    sent = 0
    while sent < total:
        piece = first if sent == 0 else pad
        piece = piece[: total - sent] if total - sent < len(piece) else piece
        sent += len(piece)
        yield piece


def upload_small(server: Server, kind: str, body: bytes, filename: str) -> str:
    r = httpx.post(
        f"{server.base_url}/v1/{kind}",
        params={"filename": filename},
        content=body,
        headers=server.headers,
        timeout=30,
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload of {filename} failed: {r.status_code} {r.text}")
    resource_id: str = r.json()["id"]
    return resource_id


# --- load phases ----------------------------------------------------------------------------


@dataclass
class Phase:
    endpoint: str
    concurrency: int
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_ms_per_req: float = 0.0
    client_cpu_ms_per_req: float = 0.0
    hit_time_cap: bool = False
    skipped: bool = False


RequestFn = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def run_phase(
    server: Server,
    endpoint: str,
    concurrency: int,
    request: RequestFn,
    expected: int,
    n_requests: int,
    cap_s: float,
    on_ok: Callable[[httpx.Response], None] | None = None,
) -> Phase:
    """``n_requests`` of ``request`` by ``concurrency`` clients (stopping at ``cap_s``)."""
    phase = Phase(endpoint, concurrency)
    latencies: list[float] = []
    next_index = 0
    start = asyncio.Event()
    ready = 0
    deadline = 0.0

    async def client_loop() -> None:
        nonlocal next_index, ready
        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers=server.headers,
            timeout=30.0,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        ) as client:
            await client.get("/healthz")  # open the connection before the clock starts
            ready += 1
            await start.wait()
            while next_index < n_requests and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                try:
                    r = await request(client, i)
                except httpx.HTTPError as exc:
                    phase.errors += 1
                    if len(phase.error_samples) < 3:
                        phase.error_samples.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code == expected:
                    phase.ok += 1
                    if on_ok is not None:
                        on_ok(r)
                else:
                    phase.errors += 1
                    if len(phase.error_samples) < 3:
                        phase.error_samples.append(f"{r.status_code}: {r.text[:200]}")

    tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
    while ready < concurrency and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    cpu_server0 = proc_cpu_s(server.proc.pid)
    cpu_client0 = time.process_time()
    t_start = time.perf_counter()
    deadline = t_start + cap_s
    start.set()
    await asyncio.gather(*tasks)
    phase.seconds = time.perf_counter() - t_start
    cpu_server = proc_cpu_s(server.proc.pid) - cpu_server0
    cpu_client = time.process_time() - cpu_client0
    phase.requests = phase.ok + phase.errors
    phase.hit_time_cap = phase.requests < n_requests
    if latencies:
        ms = np.asarray(latencies) * 1000.0
        phase.p50_ms = float(np.percentile(ms, 50))
        phase.p99_ms = float(np.percentile(ms, 99))
        phase.mean_ms = float(ms.mean())
        phase.max_ms = float(ms.max())
    if phase.requests:
        phase.rps = phase.requests / phase.seconds
        phase.server_cpu_ms_per_req = 1000.0 * cpu_server / phase.requests
        phase.client_cpu_ms_per_req = 1000.0 * cpu_client / phase.requests
    return phase


async def load_phases(
    server: Server, model_id: str, dataset_id: str, n_requests: int, cap_s: float, budget_s: float
) -> list[Phase]:
    """Every endpoint at every concurrency; the healthz baseline next to the others in time."""
    job_ids: list[str] = []
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": SPEC}

    async def healthz(c: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await c.get("/healthz")

    async def create(c: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await c.post("/v1/jobs", json=body)

    async def poll(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.get(f"/v1/jobs/{job_ids[i % len(job_ids)]}")

    async def history(c: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await c.get("/v1/jobs", params={"limit": 20})

    def keep_id(r: httpx.Response) -> None:
        job_ids.append(r.json()["id"])

    plan: dict[str, tuple[RequestFn, int, Callable[[httpx.Response], None] | None]] = {
        "healthz": (healthz, 200, None),
        "create_job": (create, 202, keep_id),
        "poll_job": (poll, 200, None),
        "list_jobs": (history, 200, None),
    }
    results: list[Phase] = []
    t0 = time.perf_counter()
    for n in CONCURRENCY:
        for endpoint in ENDPOINTS:
            if time.perf_counter() - t0 > budget_s or (endpoint == "poll_job" and not job_ids):
                results.append(Phase(endpoint, n, skipped=True))
                continue
            fn, expected, on_ok = plan[endpoint]
            phase = await run_phase(server, endpoint, n, fn, expected, n_requests, cap_s, on_ok)
            results.append(phase)
            print(
                f"  {ENDPOINT_LABELS[endpoint]:<26} N={n:<3} {phase.rps:8.1f} req/s  "
                f"p50 {phase.p50_ms:7.2f} ms  p99 {phase.p99_ms:7.2f} ms  errors {phase.errors}",
                flush=True,
            )
    return results


# --- memory during uploads ------------------------------------------------------------------


def _mib(kib: int) -> float:
    return kib / 1024.0


def memory_summary(
    sampler: RssSampler, t_before: float, t_start: float, t_end: float
) -> dict[str, Any]:
    """RSS before (last sample before ``t_start``), peak during, after, and ``VmHWM``."""
    before = [s for s in sampler.samples if t_before <= s[0] < t_start]
    during = sampler.between(t_start, t_end + SAMPLE_INTERVAL_S)
    last = sampler.samples[-1]
    base_rss, base_hwm = before[-1][1], before[-1][2]
    peak = max(s[1] for s in during) if during else base_rss
    return {
        "rss_before_mib": _mib(base_rss),
        "rss_peak_during_mib": _mib(peak),
        "rss_growth_mib": _mib(peak - base_rss),
        "rss_after_mib": _mib(last[1]),
        "hwm_before_mib": _mib(base_hwm),
        "hwm_after_mib": _mib(last[2]),
        "samples_during": len(during),
    }


def large_files(root: Path, min_bytes: int = 10 * MiB) -> list[str]:
    """Files of at least ``min_bytes`` under ``root`` (what an upload left on disk)."""
    return sorted(
        f"{p.relative_to(root)} ({p.stat().st_size / MiB:.0f} MiB)"
        for p in root.rglob("*")
        if p.is_file() and p.stat().st_size >= min_bytes
    )


async def big_upload(server: Server, head: bytes, total: int) -> dict[str, Any]:
    """Stream ``total`` bytes to ``POST /v1/models`` (chunked) while sampling the API's RSS."""
    hasher = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for piece in big_body_chunks(head, total):
            hasher.update(piece)
            yield piece

    with RssSampler(server.proc.pid) as sampler:
        t_before = time.perf_counter()
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=300.0
        ) as client:
            t_start = time.perf_counter()
            r = await client.post("/v1/models", params={"filename": "big.pt"}, content=body())
            t_end = time.perf_counter()
        await asyncio.sleep(1.0)
    seconds = t_end - t_start
    out: dict[str, Any] = {
        "bytes": total,
        "status": r.status_code,
        "seconds": seconds,
        "throughput_mb_s": total / 1e6 / seconds,
        "throughput_mib_s": total / MiB / seconds,
    }
    if r.status_code == 201:
        created = r.json()
        out["stored_size_ok"] = created.get("size") == total
        out["sha256_ok"] = created.get("sha256") == hasher.hexdigest()
        out["format"] = created.get("format")
    else:
        out["response"] = r.text[:300]
    out.update(memory_summary(sampler, t_before, t_start, t_end))
    return out


async def raw_refused_upload(
    server: Server, head: bytes, total: int, *, declare_length: bool
) -> dict[str, Any]:
    """Send ``total`` bytes over a raw socket until the response arrives; when it does, stop.

    Chunked by default (the API can only refuse once the limit is crossed); with
    ``declare_length`` a ``Content-Length`` is sent and the body after it.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    framing = f"Content-Length: {total}" if declare_length else "Transfer-Encoding: chunked"
    writer.write(
        (
            "POST /v1/models?filename=big.pt HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {server.api_key}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"{framing}\r\n\r\n"
        ).encode()
    )
    sent = 0
    sent_at_response = 0
    t_response = 0.0
    write_error = ""

    async def read_response() -> bytes:
        nonlocal sent_at_response, t_response
        line = await reader.readline()
        t_response = time.perf_counter()
        sent_at_response = sent
        return line

    with RssSampler(server.proc.pid) as sampler:
        t_before = time.perf_counter()
        await asyncio.sleep(0.5)
        t_start = time.perf_counter()
        response_task = asyncio.create_task(read_response())
        try:
            for piece in big_body_chunks(head, total):
                if response_task.done():
                    break
                if declare_length:
                    writer.write(piece)
                else:
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                await writer.drain()
                sent += len(piece)
            else:
                if not declare_length:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            write_error = f"{type(exc).__name__}: {exc}"
        try:
            status_line = await asyncio.wait_for(response_task, timeout=60)
            headers_and_body = await asyncio.wait_for(reader.read(4096), timeout=5)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            status_line, headers_and_body = b"", f"{type(exc).__name__}".encode()
        t_end = t_response or time.perf_counter()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await asyncio.sleep(1.0)
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    body_text = headers_and_body.split(b"\r\n\r\n", 1)[-1].decode("latin-1", "replace")
    out: dict[str, Any] = {
        "bytes_offered": total,
        "framing": "content-length" if declare_length else "chunked",
        "status": status,
        "error_code": _error_code(body_text),
        "time_to_refusal_s": t_end - t_start,
        "bytes_sent_when_refused_mib": sent_at_response / MiB,
        "bytes_sent_total_mib": sent / MiB,
        "client_write_error": write_error,
        "left_on_disk": large_files(server.data_dir),
    }
    out.update(memory_summary(sampler, t_before, t_start, t_end))
    return out


def _error_code(body: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError, json.JSONDecodeError):
        start = body.index("{")
        code: str = json.loads(body[start : body.rindex("}") + 1])["error"]["code"]
        return code
    return ""


# --- machine info and reports ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024**2
    versions = {}
    for pkg in ("uvicorn", "fastapi", "starlette", "httpx", "h11", "httptools", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} CPU(s), {mem_gib:.0f} GiB RAM",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'endpoint':<26} {'N':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'err':>4}")
    for p in results["load"]:
        if p["skipped"]:
            print(f"{ENDPOINT_LABELS[p['endpoint']]:<26} {p['concurrency']:>3}  skipped")
            continue
        print(
            f"{ENDPOINT_LABELS[p['endpoint']]:<26} {p['concurrency']:>3} {p['rps']:8.1f} "
            f"{p['p50_ms']:8.2f} {p['p99_ms']:8.2f} {p['errors']:>4}"
        )
    for name, m in results["memory"].items():
        print(
            f"{name}: status {m['status']}, RSS {m['rss_before_mib']:.1f} -> peak "
            f"{m['rss_peak_during_mib']:.1f} MiB (VmHWM {m['hwm_before_mib']:.1f} -> "
            f"{m['hwm_after_mib']:.1f} MiB)"
        )


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    cfg = results["config"]
    v = meta["versions"]
    lines = [
        "# API benchmark",
        "",
        f"Generated by `python -m bench.bench_api` on {meta['date']}, {meta['machine']} "
        f"(load average at start {meta['load_average_at_start']}), Python {meta['python']}, "
        f"uvicorn {v['uvicorn']} (httptools: {v['httptools']}, uvloop: {v['uvloop']}), "
        f"FastAPI {v['fastapi']}, httpx {v['httpx']}.",
        "",
        "One `uvicorn --factory api.app:create_app --workers 1` process (access log off) on the "
        "embedded default: SQLite (WAL), local storage and the filesystem broker in a temporary "
        "`MPQ_DATA_DIR`; no Celery worker, so jobs stay queued. The clients run in the "
        "benchmark's own process (asyncio, one `httpx.AsyncClient` and keep-alive connection "
        "per client) on the same machine, so client and server share its CPUs: read the rates "
        "against the `/healthz` baseline measured next to them.",
        "",
        "## Requests under concurrent clients",
        "",
        f"{cfg['requests_per_phase']} requests per phase (cap {cfg['phase_cap_s']:.0f} s). "
        "`vs healthz`: the phase's rate as a fraction of `/healthz` at the same concurrency. "
        "CPU ms/req: CPU time of the API process (server) and of the benchmark process "
        "(client) per request.",
        "",
        "| endpoint | N | requests | errors | req/s | vs healthz | p50 ms | p99 ms | max ms "
        "| server CPU ms/req | client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {p["concurrency"]: p["rps"] for p in results["load"] if p["endpoint"] == "healthz"}
    for p in results["load"]:
        label = f"`{ENDPOINT_LABELS[p['endpoint']]}`"
        if p["skipped"]:
            lines.append(f"| {label} | {p['concurrency']} | skipped | | | | | | | | |")
            continue
        ratio = p["rps"] / base[p["concurrency"]] if base.get(p["concurrency"]) else 0.0
        cap = " (time cap)" if p["hit_time_cap"] else ""
        lines.append(
            f"| {label} | {p['concurrency']} | {p['requests']}{cap} | {p['errors']} | "
            f"{p['rps']:.0f} | {ratio:.2f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['max_ms']:.1f} | {p['server_cpu_ms_per_req']:.2f} | "
            f"{p['client_cpu_ms_per_req']:.2f} |"
        )
    errors = [p for p in results["load"] if p["error_samples"]]
    if errors:
        lines += ["", "Error samples:", ""]
        for p in errors:
            lines.append(
                f"- {ENDPOINT_LABELS[p['endpoint']]} N={p['concurrency']}: "
                + "; ".join(f"`{e}`" for e in p["error_samples"])
            )
    mem = results["memory"]
    big = mem["upload_accepted"]
    size_mib = f"{cfg['big_upload_bytes'] / MiB:.0f}"
    lines += [
        "",
        "## Memory of the API process during uploads",
        "",
        f"A {cfg['big_upload_bytes'] / MiB:.0f} MiB ({cfg['big_upload_bytes'] / 1e6:.0f} MB) "
        "body generated on the fly in 1 MiB chunks (a real TorchScript archive, then padding), "
        "streamed to `POST /v1/models?filename=big.pt`; the API process's `VmRSS` and `VmHWM` "
        f"(`/proc/<pid>/status`) sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms. RSS before: "
        "last sample before the upload; peak: largest sample during it; `VmHWM` is the kernel's "
        "own peak, so it also catches a spike between samples.",
        "",
        "| case | limit | status | time | client sent | RSS before MiB | RSS peak MiB | growth MiB "
        "| VmHWM before -> after MiB | RSS after MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {size_mib} MiB accepted (chunked) | {cfg['big_limit_bytes'] / MiB:.0f} MiB | "
        f"{big['status']} | {big['seconds']:.2f} s ({big['throughput_mb_s']:.0f} MB/s) | "
        f"{big['bytes'] / MiB:.0f} MiB | {big['rss_before_mib']:.1f} | "
        f"{big['rss_peak_during_mib']:.1f} | {big['rss_growth_mib']:.1f} | "
        f"{big['hwm_before_mib']:.1f} -> {big['hwm_after_mib']:.1f} | {big['rss_after_mib']:.1f} |",
    ]
    for key, label in (
        ("refused_chunked", f"{size_mib} MiB refused mid-stream (chunked)"),
        ("refused_content_length", f"{size_mib} MiB with Content-Length declared"),
    ):
        m = mem[key]
        lines.append(
            f"| {label} | {cfg['small_limit_bytes'] / MiB:.0f} MiB | {m['status']} "
            f"`{m['error_code']}` | {m['time_to_refusal_s'] * 1000:.0f} ms to the 413 | "
            f"{m['bytes_sent_when_refused_mib']:.0f} MiB | {m['rss_before_mib']:.1f} | "
            f"{m['rss_peak_during_mib']:.1f} | {m['rss_growth_mib']:.1f} | "
            f"{m['hwm_before_mib']:.1f} -> {m['hwm_after_mib']:.1f} | {m['rss_after_mib']:.1f} |"
        )
    lines += [
        "",
        f"Accepted upload: stored size matches: {big.get('stored_size_ok')}, sha256 matches the "
        f"client's: {big.get('sha256_ok')}, sniffed format `{big.get('format')}`. "
        "Throughput is end to end (first byte sent to the 201, including the fsync of the "
        "stored file). Refused uploads: large files left under the data folder afterwards: "
        f"chunked {mem['refused_chunked']['left_on_disk'] or 'none'}, Content-Length "
        f"{mem['refused_content_length']['left_on_disk'] or 'none'}. "
        "`client sent`: bytes the client had written into the socket when the 413 arrived "
        "(some are still in socket buffers, not read by the API).",
        "",
        f"Total run time: {results['total_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = torchscript_model_bytes()
    data = mlp_data_npz()
    results: dict[str, Any] = {"memory": {}}

    print("starting the API (limit 1 GiB) ...", flush=True)
    server = start_server(work / "big", BIG_LIMIT_BYTES)
    try:
        model_id = upload_small(server, "models", model, "mlp.pt")
        dataset_id = upload_small(server, "datasets", data, "calib.npz")
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as c:
            # Warm-up: first job (builds the Celery app), a poll and a listing.
            body = {"model_id": model_id, "dataset_id": dataset_id, "spec": SPEC}
            for _ in range(5):
                r = await c.post("/v1/jobs", json=body)
                if r.status_code != 202:
                    raise RuntimeError(f"job creation failed: {r.status_code} {r.text}")
                await c.get(f"/v1/jobs/{r.json()['id']}")
                await c.get("/v1/jobs", params={"limit": 20})
        print(f"streaming {args.upload_mib} MiB to POST /v1/models ...", flush=True)
        results["memory"]["upload_accepted"] = await big_upload(
            server, model, args.upload_mib * MiB
        )
        print("load phases ...", flush=True)
        phases = await load_phases(
            server, model_id, dataset_id, args.requests, args.cap, LOAD_BUDGET_S
        )
        results["load"] = [asdict(p) for p in phases]
    finally:
        server.stop()

    print("starting the API (limit 100 MiB) ...", flush=True)
    small = start_server(work / "small", SMALL_LIMIT_BYTES)
    try:
        for key, declared in (("refused_chunked", False), ("refused_content_length", True)):
            results["memory"][key] = await raw_refused_upload(
                small, model, args.upload_mib * MiB, declare_length=declared
            )
    finally:
        small.stop()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS_PER_PHASE)
    parser.add_argument("--cap", type=float, default=PHASE_CAP_S, help="seconds per phase, max")
    parser.add_argument("--upload-mib", type=int, default=BIG_UPLOAD_BYTES // MiB)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    meta = machine_info()
    work = Path(tempfile.mkdtemp(prefix="mpq-bench-api-"))
    try:
        results = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "meta": meta,
        "config": {
            "concurrency": list(CONCURRENCY),
            "requests_per_phase": args.requests,
            "phase_cap_s": args.cap,
            "big_upload_bytes": args.upload_mib * MiB,
            "big_limit_bytes": BIG_LIMIT_BYTES,
            "small_limit_bytes": SMALL_LIMIT_BYTES,
            "rss_sample_interval_s": SAMPLE_INTERVAL_S,
            "job_spec": SPEC,
        },
        **results,
        "total_seconds": time.perf_counter() - t0,
    }
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "api.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "api.md").write_text(to_markdown(results))
    print(f"\nwrote {args.out / 'api.json'} and {args.out / 'api.md'}")
    return results


if __name__ == "__main__":
    main()
