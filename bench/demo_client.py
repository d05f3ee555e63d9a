"""The service demo: quantize the digits CNN through the REST API of the embedded ``mpq serve``.

``python -m bench.demo_client`` (the last step of ``make demo``):

1. trains (or reuses) the digits CNN of :mod:`bench.digits`, saved as TorchScript with its
   calibration and test data under ``bench/work/``;
2. creates an API key with ``mpq keys create demo`` and starts ``mpq serve`` on a free port, both
   with ``MPQ_DATA_DIR=bench/work/service``, and waits for ``/readyz``;
3. over HTTP only, with the Python client (``mpq_client``, client/): uploads the model, the
   calibration and the test data, submits a job (average 2.5 bits, ``conv1`` pinned to 8 bits,
   10 fine-tuning epochs), waits for it printing stage and progress, lists its artifacts and
   downloads ``model.pt`` and ``report.json`` (each checked against its listed sha256);
4. loads the downloaded model with stock ``torch.jit.load`` and prints the test accuracy of the
   float and the quantized model next to the job report's before/after metrics;
5. stops the server (and so its worker).

Any failure exits non-zero with a message saying what went wrong.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.digits import WORK, prepare
from mpq_client import Client, Job, JobCancelled, JobFailed, MpqClientError
from tests.support.processes import ServiceNotReady, start_http_service

__all__ = ["DemoError", "main", "run_demo"]

SERVICE_DIR = WORK / "service"
JOB_SPEC: dict[str, Any] = {
    "budgets": ["avg-bits=2.5"],
    "pins": {"conv1\\.weight": 8},
    "finetune": {"epochs": 10},
}
READY_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 600.0
ROOT = Path(__file__).resolve().parents[1]


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _say(message: str) -> None:
    print(message, flush=True)


def _service_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env["MPQ_DATA_DIR"] = str(data_dir)
    return env


def _mpq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpq_core.cli", *args]


def create_key(data_dir: Path) -> str:
    """``mpq keys create demo --tenant demo`` on the service's database; the plaintext key."""
    done = subprocess.run(
        _mpq("keys", "create", "demo", "--tenant", "demo"),
        env=_service_env(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise DemoError(f"mpq keys create failed (exit {done.returncode}):\n{done.stderr}")
    key = done.stdout.strip()
    if not key.startswith("mpq_"):
        raise DemoError(f"mpq keys create printed no key: {done.stdout!r}")
    return key


@contextmanager
def running_server(data_dir: Path, log_path: Path) -> Iterator[str]:
    """``mpq serve`` on a free port until the block ends; yields its base URL once ready."""
    proc, base = start_http_service(
        "mpq serve",
        lambda port: _mpq("serve", "--port", str(port)),
        env=_service_env(data_dir),
        cwd=ROOT,
        log_path=log_path,
        timeout_s=READY_TIMEOUT_S,
    )
    try:
        _say(f"mpq serve is ready at {base} (pid {proc.pid}, log {log_path})")
        yield base
    finally:
        code = proc.stop(timeout_s=30)
        _say(f"mpq serve stopped (exit code {code})")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _upload(client: Client, kind: str, path: Path) -> str:
    upload = client.upload_model if kind == "models" else client.upload_dataset
    done = upload(path)
    _say(f"uploaded {path.name} ({done.size:,} B) -> /v1/{kind}/{done.id}")
    return done.id


def _show_changes() -> Callable[[Job], None]:
    """A progress callback printing every change of status, stage or progress."""
    last: list[tuple[str, str | None, float]] = []

    def show(job: Job) -> None:
        now = (job.status, job.stage, job.progress)
        if not last or now != last[-1]:
            _say(f"  {job.status:<10} stage {job.stage or '-':<10} progress {job.progress:6.1%}")
            last.append(now)

    return show


def _wait(client: Client, job_id: str, log_path: Path) -> Job:
    """Wait for the job to succeed; a failed or cancelled job is a :class:`DemoError`."""
    try:
        return client.wait(job_id, timeout=JOB_TIMEOUT_S, progress=_show_changes())
    except (JobFailed, JobCancelled) as exc:
        raise DemoError(f"{exc}; server log:\n{_tail(log_path)}") from None


def _accuracy(model: torch.jit.ScriptModule, npz: Path) -> float:
    with np.load(npz) as data:
        inputs = torch.from_numpy(data["input"])
        labels = torch.from_numpy(data["labels"])
    with torch.no_grad():
        logits = model(inputs)
    return float((logits.argmax(dim=-1) == labels).float().mean())


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    cols = [c for c in ("float", "quantized", "finetuned") if c in metrics]
    lines = [f"{'':<10}" + "".join(f"{c:>12}" for c in cols)]
    for key in ("accuracy", "loss", "cosine", "sqnr_db"):
        row = [(metrics[c] or {}).get(key) for c in cols]
        if any(v is not None for v in row):
            lines.append(f"{key:<10}" + "".join(f"{_fmt(v):>12}" for v in row))
    return lines


def run_demo(data_dir: Path = SERVICE_DIR, out_dir: Path | None = None) -> None:
    """The whole demo; raises :class:`DemoError` (or the client's error) on any failure."""
    data_dir = data_dir.resolve()
    out_dir = (out_dir or data_dir / "download").resolve()
    _say("== 1. the digits CNN (TorchScript) and its calibration/test data")
    prepared = prepare("cnn")
    model_path = prepared.model_path
    calib_path = model_path.with_name("digits_cnn_calib.npz")
    test_path = model_path.with_name("digits_cnn_test.npz")
    _say(f"{model_path} (float test accuracy {prepared.float_test_accuracy:.4f})")

    _say(f"== 2. API key and the embedded service (data under {data_dir})")
    key = create_key(data_dir)
    _say(f"created API key {key[:8]}... with `mpq keys create demo --tenant demo`")
    with (
        running_server(data_dir, data_dir / "serve.log") as base,
        Client(base, key, timeout=60.0) as client,
    ):
        _say("== 3. upload, submit, poll")
        model_id = _upload(client, "models", model_path)
        calib_id = _upload(client, "datasets", calib_path)
        test_id = _upload(client, "datasets", test_path)
        job = client.submit(model_id, calib_id, JOB_SPEC, eval_dataset=test_id)
        _say(f"job {job.id} submitted with spec {json.dumps(JOB_SPEC)}")
        job = _wait(client, job.id, data_dir / "serve.log")
        sandbox = (job.result or {}).get("sandbox") or {}
        _say(
            f"the model ran in the worker's sandbox: isolation {sandbox.get('isolation')}, "
            f"{sandbox.get('cpu_seconds')} s of CPU"
        )
        _say("== 4. artifacts")
        for item in client.artifacts(job):
            _say(f"  {item.name:<24} {item.size:>9,} B  sha256 {item.sha256[:12]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        downloaded = {
            name: client.download(job, name, out_dir).read_bytes()
            for name in ("model.pt", "report.json")
        }
        _say(f"downloaded model.pt and report.json to {out_dir} (sha256 checked)")
    report = json.loads(downloaded["report.json"])

    _say("== 5. the downloaded model, loaded with stock torch.jit.load")
    float_model = torch.jit.load(str(model_path)).eval()
    quant_model = torch.jit.load(io.BytesIO(downloaded["model.pt"])).eval()
    float_acc = _accuracy(float_model, test_path)
    quant_acc = _accuracy(quant_model, test_path)
    _say(f"test accuracy: float {float_acc:.4f}, quantized (downloaded) {quant_acc:.4f}")
    allocation = report.get("allocation") or {}
    _say("bits: " + ", ".join(f"{name} {bits}" for name, bits in allocation.items()))
    for budget in report.get("budgets") or []:
        _say(f"budget {budget['label']}: achieved {budget['achieved']:.4g}")
    sizes = report.get("sizes") or {}
    if sizes:
        _say(
            f"size: {sizes['packed_checkpoint_bytes']:,} B packed, "
            f"float32 {sizes['float32_bytes']:,} B"
        )
    _say("job report (test data), before and after:")
    for line in _metrics_table(report.get("metrics") or {}):
        _say("  " + line)
    reported = ((report.get("metrics") or {}).get("finetuned") or {}).get("accuracy")
    if reported is not None and abs(reported - quant_acc) > 0.01:
        raise DemoError(
            f"the downloaded model scores {quant_acc:.4f}, the report says {reported:.4f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_client", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=SERVICE_DIR, help="MPQ_DATA_DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run_demo(args.data_dir)
    except (DemoError, ServiceNotReady, MpqClientError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    _say("demo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
