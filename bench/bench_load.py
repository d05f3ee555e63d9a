"""Load benchmark: N concurrent clients submitting small jobs and polling them for D seconds,
against a real ``mpq serve`` on each set-up, with the workers really running the jobs.

Run: ``python -m bench.bench_load`` (defaults: 200 clients, 600 s, both set-ups). Writes
``bench/results/load.{json,md}``; a run of one set-up (``--setups postgres``) replaces that
set-up's results and keeps the other's.

Set-ups (everything on 127.0.0.1, local storage in a temporary ``MPQ_DATA_DIR``):

- ``embedded``: ``mpq serve`` as shipped: SQLite, the filesystem broker, and the one worker it
  starts beside the API (solo pool, one job at a time).
- ``postgres``: ``mpq serve --no-worker`` on a fresh Postgres database with Redis as the broker
  (an empty Redis database claimed for the run), and one Celery worker started separately
  (prefork, concurrency 1), as in docker-compose.yml.

Each client (asyncio, its own ``httpx.AsyncClient``, so its own connection) starts within the
first ``--ramp`` seconds, uploads its own tiny TorchScript model and calibration ``.npz``, then
until D seconds have passed: submits a job (JSON naming its uploads; one job in 10 as one
``multipart/form-data`` request carrying the files), polls it at the server's ``Retry-After``
until it is final, and reads its job history (``GET /v1/jobs?limit=20``). After D seconds no new
job is submitted and the clients poll their last job for up to ``--drain`` seconds more.

Reported per route class: requests, p50/p99/max latency, 4xx, 5xx, client time-outs (no answer
within ``--timeout`` seconds) and transport errors; jobs submitted, how many reached a final
state (and which), and what the service logs hold (tracebacks, SQLite's "database is locked").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.bench_api import machine_info, torchscript_model_bytes
from tests.support.files import mlp_data_npz
from tests.support.processes import ServiceProcess, start_celery_worker, start_http_service

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MPQ = Path(sys.executable).parent / "mpq"
PEPPER = "bench-load-pepper"
SETUPS = ("embedded", "postgres")
ROUTES = ("upload", "create_job", "create_job_form", "poll_job", "list_jobs")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
FORM_EVERY = 10  # every 10th job is submitted as a multipart form with its files
SPEC: dict[str, Any] = {"budgets": ["avg-bits=4"], "bits": [2, 4, 8], "finetune": {"epochs": 0}}
LOG_MARKERS = {
    "tracebacks": "Traceback",
    "database_is_locked": "database is locked",
    "unhandled_errors": "unhandled error",
}


# --- what the clients saw ------------------------------------------------------------------


@dataclass
class Recorder:
    """Every request's outcome, by route class, and every job's end."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROUTES})
    status: dict[str, Counter[int]] = field(default_factory=lambda: {r: Counter() for r in ROUTES})
    timeouts: Counter[str] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    submitted: int = 0
    final: Counter[str] = field(default_factory=Counter)
    failure_codes: Counter[str] = field(default_factory=Counter)
    unfinished: int = 0

    def note_error(self, text: str) -> None:
        if len(self.error_samples) < 20:
            self.error_samples.append(text[:300])

    async def request(
        self, client: httpx.AsyncClient, route: str, method: str, url: str, **kw: Any
    ) -> httpx.Response | None:
        """The response, or None after a time-out or a transport error (counted)."""
        t0 = time.perf_counter()
        try:
            response = await client.request(method, url, **kw)
        except httpx.TimeoutException as exc:
            self.timeouts[route] += 1
            self.note_error(f"{route}: time-out ({type(exc).__name__})")
            return None
        except httpx.TransportError as exc:
            self.transport_errors[route] += 1
            self.note_error(f"{route}: {type(exc).__name__}: {exc}")
            return None
        self.latencies[route].append(time.perf_counter() - t0)
        self.status[route][response.status_code] += 1
        if response.status_code >= 500:
            self.note_error(f"{route}: {response.status_code} {response.text}")
        return response


# --- one client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    base_url: str
    key: str
    model: bytes
    data: bytes
    ramp_s: float
    stop_at: float  # monotonic: no job is submitted after this
    drain_until: float  # monotonic: no poll after this
    timeout_s: float


async def _upload(client: httpx.AsyncClient, rec: Recorder, kind: str, body: bytes) -> str | None:
    r = await rec.request(client, "upload", "POST", f"/v1/{kind}", content=body)
    return str(r.json()["id"]) if r is not None and r.status_code == 201 else None


async def _submit(
    client: httpx.AsyncClient, rec: Recorder, plan: Plan, n: int, ids: tuple[str, str]
) -> httpx.Response | None:
    if n % FORM_EVERY == 0:
        files = {
            "model": ("m.pt", plan.model),
            "data": ("d.npz", plan.data),
            "spec": (None, json.dumps(SPEC)),
        }
        return await rec.request(client, "create_job_form", "POST", "/v1/jobs", files=files)
    body = {"model_id": ids[0], "dataset_id": ids[1], "spec": SPEC}
    return await rec.request(client, "create_job", "POST", "/v1/jobs", json=body)


async def _follow(
    client: httpx.AsyncClient, rec: Recorder, plan: Plan, job_id: str, wait_s: float
) -> None:
    """Poll the job at the server's Retry-After until it is final (or the drain ends)."""
    while time.monotonic() + wait_s < plan.drain_until:
        await asyncio.sleep(wait_s)
        r = await rec.request(client, "poll_job", "GET", f"/v1/jobs/{job_id}")
        if r is None or r.status_code != 200:
            wait_s = 2.0
            continue
        job = r.json()
        if job["status"] in FINAL:
            rec.final[job["status"]] += 1
            if job["status"] == "failed":
                rec.failure_codes[(job.get("error") or {}).get("code") or "?"] += 1
            return
        wait_s = float(r.headers.get("Retry-After", "2"))
    rec.unfinished += 1


async def run_client(plan: Plan, rec: Recorder, seed: int) -> None:
    await asyncio.sleep(random.Random(seed).uniform(0, plan.ramp_s))
    headers = {"Authorization": f"Bearer {plan.key}"}
    async with httpx.AsyncClient(
        base_url=plan.base_url, headers=headers, timeout=plan.timeout_s
    ) as client:
        ids = (
            await _upload(client, rec, "models", plan.model),
            await _upload(client, rec, "datasets", plan.data),
        )
        if ids[0] is None or ids[1] is None:
            return
        n = seed  # client i's first form job is its (10 - i % 10)-th: 1 job in 10 overall
        while time.monotonic() < plan.stop_at:
            r = await _submit(client, rec, plan, n, (ids[0], ids[1]))
            n += 1
            if r is None or r.status_code != 202:
                await asyncio.sleep(2.0)
                continue
            rec.submitted += 1
            retry_after = float(r.headers.get("Retry-After", "2"))
            await _follow(client, rec, plan, r.json()["id"], retry_after)
            await rec.request(client, "list_jobs", "GET", "/v1/jobs", params={"limit": 20})


async def run_clients(plan: Plan, clients: int) -> Recorder:
    rec = Recorder()
    await asyncio.gather(*(run_client(plan, rec, i) for i in range(clients)))
    return rec


# --- the set-ups ---------------------------------------------------------------------------


@dataclass
class Service:
    base_url: str
    key: str
    processes: list[ServiceProcess]
    description: str

    def logs(self) -> str:
        return "\n".join(p.log_path.read_text(errors="replace") for p in self.processes)


def _env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env.update(MPQ_DATA_DIR=str(data_dir), MPQ_API_KEY_PEPPER=PEPPER, PYTHONUNBUFFERED="1")
    env.update({f"MPQ_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _make_key(database_url: str) -> str:
    from api.auth import create_key
    from mpq_service.db import make_engine, make_sessionmaker, session_scope
    from mpq_service.migrate import upgrade

    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            return create_key(session, "bench", "load", pepper=PEPPER)
    finally:
        engine.dispose()


def _serve(work: Path, env: dict[str, str], *extra: str) -> tuple[ServiceProcess, str]:
    return start_http_service(
        "mpq serve",
        lambda port: [str(MPQ), "serve", "--port", str(port), *extra],
        env=env,
        cwd=work,
        log_path=work / "serve.log",
        ready_path="/readyz",
        timeout_s=120,
    )


@contextmanager
def embedded(work: Path) -> Iterator[Service]:
    data_dir = work / "data"
    key = _make_key(f"sqlite:///{data_dir / 'mpq.db'}")
    proc, base_url = _serve(work, _env(data_dir))
    try:
        yield Service(base_url, key, [proc], "mpq serve: SQLite, filesystem broker, its worker")
    finally:
        proc.stop(timeout_s=30)


def _start_worker(work: Path, env: dict[str, str]) -> ServiceProcess:
    return start_celery_worker("worker", env, ROOT, work / "worker.log", node="bench")


@contextmanager
def postgres(work: Path) -> Iterator[Service]:
    from tests.support.postgres import admin_engine, create_database, drop_database
    from tests.support.redis_db import claimed_redis_db

    admin = admin_engine()
    url = create_database(admin, prefix="mpq_bench")
    try:
        with claimed_redis_db() as redis_url, ExitStack() as stack:
            key = _make_key(url)
            env = _env(work / "data", database_url=url, broker_url=redis_url)
            worker = _start_worker(work, env)
            stack.callback(worker.stop, 30)
            proc, base_url = _serve(work, env, "--no-worker")
            stack.callback(proc.stop, 30)
            yield Service(base_url, key, [proc, worker], "mpq serve --no-worker: Postgres, "
                          "Redis broker, one Celery worker (prefork, concurrency 1)")  # fmt: skip
    finally:
        drop_database(admin, url)
        admin.dispose()


# --- reporting -----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summarize(rec: Recorder, service: Service, config: dict[str, Any]) -> dict[str, Any]:
    routes = {}
    for route in ROUTES:
        lat = rec.latencies[route]
        status = rec.status[route]
        routes[route] = {
            "requests": len(lat) + rec.timeouts[route] + rec.transport_errors[route],
            "p50_ms": _pct(lat, 0.50),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": max(lat) * 1000 if lat else None,
            "status_4xx": sum(n for s, n in status.items() if 400 <= s < 500),
            "status_5xx": sum(n for s, n in status.items() if s >= 500),
            "timeouts": rec.timeouts[route],
            "transport_errors": rec.transport_errors[route],
            "statuses": {str(s): n for s, n in sorted(status.items())},
        }
    logs = service.logs()
    return {
        "setup": service.description,
        "config": config,
        "routes": routes,
        "jobs": {
            "submitted": rec.submitted,
            "final": dict(rec.final),
            "reached_final": sum(rec.final.values()),
            "failure_codes": dict(rec.failure_codes),
            "unfinished": rec.unfinished,
        },
        "logs": {name: logs.count(marker) for name, marker in LOG_MARKERS.items()},
        "error_samples": rec.error_samples,
    }


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def setup_markdown(name: str, res: dict[str, Any]) -> list[str]:
    c, jobs, logs = res["config"], res["jobs"], res["logs"]
    lines = [
        f"## {name}: {res['setup']}",
        "",
        f"{c['clients']} clients, {c['duration_s']:.0f} s of submitting (ramp {c['ramp_s']:.0f} s)"
        f", then up to {c['drain_s']:.0f} s of draining; client time-out {c['timeout_s']:.0f} s; "
        f"wall time {res['wall_s']:.0f} s; run on {res['date']}.",
        "",
        "| route | requests | p50 ms | p99 ms | max ms | 4xx | 5xx | time-outs | transport errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for route, r in res["routes"].items():
        lines.append(
            f"| {route} | {r['requests']} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{_fmt(r['max_ms'])} | {r['status_4xx']} | {r['status_5xx']} | {r['timeouts']} | "
            f"{r['transport_errors']} |"
        )
    finals = ", ".join(f"{k} {v}" for k, v in sorted(jobs["final"].items())) or "none"
    lines += [
        "",
        f"Jobs: {jobs['submitted']} submitted, {jobs['reached_final']} reached a final state "
        f"({finals}), {jobs['unfinished']} not final when the drain ended"
        + (f"; failure codes {jobs['failure_codes']}" if jobs["failure_codes"] else "")
        + ".",
        f"Service logs: {logs['tracebacks']} tracebacks, {logs['unhandled_errors']} unhandled "
        f"errors, {logs['database_is_locked']} 'database is locked'.",
        "",
    ]
    if res["error_samples"]:
        lines += ["Error samples:", "", *[f"- `{s}`" for s in res["error_samples"]], ""]
    return lines


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Load benchmark",
        "",
        "`python -m bench.bench_load` (see its docstring). Clients and services share this "
        "machine's CPUs. Latencies are per request, from the client's send to the full "
        "response. Route classes: `upload` (POST /v1/models and /v1/datasets, a few KB), "
        "`create_job` (POST /v1/jobs, JSON), `create_job_form` (POST /v1/jobs, multipart with "
        "the files), `poll_job` (GET /v1/jobs/{id}), `list_jobs` (GET /v1/jobs?limit=20).",
        "",
    ]
    for name in SETUPS:
        if name in results["setups"]:
            lines += setup_markdown(name, results["setups"][name])
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def run_setup(name: str, args: argparse.Namespace, model: bytes, data: bytes) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"mpq-bench-load-{name}-"))
    start = embedded if name == "embedded" else postgres
    t0 = time.monotonic()
    try:
        with start(work) as service:
            now = time.monotonic()
            plan = Plan(service.base_url, service.key, model, data, args.ramp,
                        now + args.duration, now + args.duration + args.drain, args.timeout)  # fmt: skip
            rec = asyncio.run(run_clients(plan, args.clients))
            config = {"clients": args.clients, "duration_s": args.duration, "ramp_s": args.ramp,
                      "drain_s": args.drain, "timeout_s": args.timeout, "job_spec": SPEC}  # fmt: skip
            result = summarize(rec, service, config)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.monotonic() - t0
    result["date"] = machine_info()["date"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of submitting")
    p.add_argument("--drain", type=float, default=600.0, help="seconds to let jobs finish")
    p.add_argument("--ramp", type=float, default=10.0, help="clients start within this")
    p.add_argument("--timeout", type=float, default=30.0, help="client time-out per request")
    p.add_argument("--setups", default=",".join(SETUPS), help="embedded,postgres")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model, data = torchscript_model_bytes(), mlp_data_npz(64)
    path = args.out / "load.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"setups": {}}
    results["meta"] = machine_info()
    for name in args.setups.split(","):
        print(f"{name}: {args.clients} clients for {args.duration:.0f} s ...", flush=True)
        results["setups"][name] = run_setup(name, args, model, data)
        print("\n".join(setup_markdown(name, results["setups"][name])), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "load.md").write_text(to_markdown(results))
    print(f"wrote {path} and {args.out / 'load.md'}")
    return results


if __name__ == "__main__":
    main()
