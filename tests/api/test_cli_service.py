"""The ``mpq`` entry point's service commands, run as real processes (no mocks).

``mpq keys create`` prints a key that authenticates; ``mpq serve`` answers health checks, takes an
upload and a job that its embedded worker runs to the end, and on SIGTERM leaves neither itself
nor its worker behind; the engine's commands still work through the same entry point.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from api.auth import authenticate
from mpq_service.db import make_engine, make_sessionmaker
from mpq_service.settings import Settings
from tests.support.jobs import wait_for_job
from tests.support.processes import ServiceProcess, pid_alive, start_http_service, wait_pid_gone
from tests.worker.conftest import SPEC, mlp_npz

MPQ = Path(sys.executable).parent / "mpq"
JOB_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module", autouse=True)
def _entry_point() -> None:
    assert MPQ.exists(), (
        f"{MPQ} not found: run .venv/bin/pip install -q -c constraints.txt -e '.[dev,service]'"
    )
    head = MPQ.read_text(errors="replace")
    assert "mpq_core.cli" in head, f"{MPQ} does not run mpq_core.cli:main: re-run pip install -e ."


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env["MPQ_DATA_DIR"] = str(data_dir)
    return env


def _mpq(
    *args: str, data_dir: Path, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MPQ), *args],
        env=_env(data_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _create_key(data_dir: Path, cwd: Path, name: str = "ci", tenant: str = "acme") -> str:
    done = _mpq("keys", "create", name, "--tenant", tenant, data_dir=data_dir, cwd=cwd)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold only the key, got {done.stdout!r}"
    return lines[0]


def test_keys_create_prints_only_a_key_that_authenticates(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = _create_key(data_dir, tmp_path)
    again = _create_key(data_dir, tmp_path, name="second")  # migrated already: no-op, new key
    assert key.startswith("mpq_") and again.startswith("mpq_") and key != again

    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            pepper = settings.api_key_pepper.get_secret_value()
            tenant = authenticate(session, key, pepper)
            assert tenant is not None and tenant.name == "acme"
            other = authenticate(session, again, pepper)
            assert other is not None and other.id == tenant.id
            wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
            assert authenticate(session, wrong, pepper) is None
    finally:
        engine.dispose()


def _tenant_of(data_dir: Path, key: str) -> str | None:
    """The tenant the key authenticates as, or None (unknown or revoked)."""
    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            tenant = authenticate(session, key, settings.api_key_pepper.get_secret_value())
            return None if tenant is None else tenant.name
    finally:
        engine.dispose()


def test_keys_list_shows_every_key_without_secrets_and_revoke_turns_one_off(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    ci = _create_key(data_dir, tmp_path, name="ci", tenant="acme")
    laptop = _create_key(data_dir, tmp_path, name="laptop", tenant="acme")
    other = _create_key(data_dir, tmp_path, name="ci", tenant="globex")

    done = _mpq("keys", "list", "--json", data_dir=data_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(k["name"], k["tenant"], k["revoked_at"]) for k in listed] == [
        ("ci", "acme", None), ("laptop", "acme", None), ("ci", "globex", None)
    ]  # fmt: skip
    assert [k["prefix"] for k in listed] == [ci[:8], laptop[:8], other[:8]]
    assert not any(secret[8:] in done.stdout for secret in (ci, laptop, other))
    table = _mpq("keys", "list", "--tenant", "globex", data_dir=data_dir, cwd=tmp_path).stdout
    assert table.splitlines()[0].split() == [
        "id", "prefix", "name", "tenant", "created_at", "revoked_at"
    ]  # fmt: skip
    assert len(table.splitlines()) == 2 and listed[2]["id"] in table

    done = _mpq("keys", "revoke", listed[1]["id"], data_dir=data_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "'laptop'" in done.stderr
    assert (_tenant_of(data_dir, ci), _tenant_of(data_dir, laptop)) == ("acme", None)
    assert _tenant_of(data_dir, other) == "globex"
    after = json.loads(_mpq("keys", "list", "--json", data_dir=data_dir, cwd=tmp_path).stdout)
    assert [k["revoked_at"] is not None for k in after] == [False, True, False]

    # By prefix, limited to a tenant: the other tenant's key of the same prefix is not touched.
    done = _mpq("keys", "revoke", other[:8], "--tenant", "acme", data_dir=data_dir, cwd=tmp_path)
    assert done.returncode == 2 and "[key_not_found]" in done.stderr
    assert _tenant_of(data_dir, other) == "globex"
    done = _mpq("keys", "revoke", other[:8], data_dir=data_dir, cwd=tmp_path)
    assert done.returncode == 0 and _tenant_of(data_dir, other) is None


def test_entry_point_keeps_the_engine_commands(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    model = tmp_path / "mlp.pt"
    model.write_bytes(zoo_bytes("mlp", "script"))
    data = tmp_path / "mlp.npz"
    data.write_bytes(mlp_npz(16))
    done = _mpq("inspect", str(model), "--data", str(data), data_dir=tmp_path / "d", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torchscript model, 3 quantizable layers" in done.stdout

    done = _mpq("inspect", str(tmp_path / "missing.pt"), "--data", str(data),
                data_dir=tmp_path / "d", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("mpq: error [")

    # The entry point and the service's commands load neither torch nor the service's libraries.
    probe = (
        "import sys, mpq_core.cli, api.cli; mpq_core.cli.build_parser(); "
        "print(sorted({'torch', 'fastapi', 'celery', 'pydantic'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_settings_that_do_not_validate_are_a_clean_error(tmp_path: Path) -> None:
    env = {**_env(tmp_path / "d"), "MPQ_MAX_UPLOAD_BYTES": "lots"}
    done = subprocess.run(
        [str(MPQ), "keys", "create", "ci"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("mpq: error [bad_settings]: "), done.stderr
    assert "max_upload_bytes" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServiceProcess, str]]:
    """``mpq serve`` on a free port with MPQ_DATA_DIR=tmp, ready; (process, base URL)."""
    proc, base = start_http_service(
        "mpq serve",
        lambda port: [str(MPQ), "serve", "--port", str(port)],
        env=_env(tmp_path / "data"),
        cwd=tmp_path,
        log_path=tmp_path / "serve.log",
        timeout_s=READY_TIMEOUT_S,
    )
    try:
        yield proc, base
    finally:
        proc.stop()
        match = re.search(r"worker started \(pid (\d+)", proc.tail(10_000))
        if match and pid_alive(int(match.group(1))):
            os.kill(int(match.group(1)), signal.SIGKILL)


def test_serve_runs_a_job_with_its_worker_and_stops_both(
    tmp_path: Path,
    zoo_bytes: Callable[[str, str], bytes],
    served: tuple[ServiceProcess, str],
) -> None:
    proc, base = served
    key = _create_key(tmp_path / "data", tmp_path)

    def log_tail() -> str:
        return proc.tail(100)

    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}

    match = re.search(r"worker started \(pid (\d+)", log_tail())
    assert match, log_tail()
    worker_pid = int(match.group(1))
    assert pid_alive(worker_pid)

    model_bytes = zoo_bytes("mlp", "script")
    assert httpx.post(f"{base}/v1/models", content=model_bytes).status_code == 401
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        response = client.post("/v1/models", params={"filename": "mlp.pt"}, content=model_bytes)
        assert response.status_code == 201, response.text
        model_id = response.json()["id"]
        response = client.post("/v1/datasets", params={"filename": "d.npz"}, content=mlp_npz())
        assert response.status_code == 201, response.text
        dataset_id = response.json()["id"]
        response = client.post(
            "/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": SPEC}
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        job = wait_for_job(
            client,
            job_id,
            timeout_s=JOB_TIMEOUT_S,
            check=lambda: None if pid_alive(worker_pid) else "the worker died",
            describe=log_tail,
        )
        assert job["status"] == "succeeded", f"{job['error']}\n{log_tail()}"
        assert job["progress"] == 1.0

        names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        assert {"model.pt", "report.json"} <= names
        response = client.get(f"/v1/jobs/{job_id}/artifacts/model.pt")
        assert response.status_code == 200
        quantized = torch.jit.load(io.BytesIO(response.content))
        assert quantized(torch.randn(3, 16)).shape == (3, 5)
        report = client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()
        assert report["metrics"]["finetuned"] is not None

    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=30) == 0, log_tail()
    assert wait_pid_gone(worker_pid, 5), f"worker {worker_pid} still running:\n{log_tail()}"
    assert "worker stopped" in log_tail()
