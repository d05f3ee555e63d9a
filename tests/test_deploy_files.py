"""docker-compose.yml, Dockerfile and .dockerignore, checked without a Docker engine: parsed, and
the commands of the services run outside containers (the same modules, factories and flags)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpq_service.settings import Settings
from tests.support.net import free_port
from tests.support.processes import start_http_service

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

MPQ_SERVICES = ("migrate", "api", "worker")
SETTINGS_VARS = {f"MPQ_{name.upper()}" for name in Settings.model_fields}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` with ``env`` (default
    empty: every variable takes its default), ``$$`` an escaped dollar."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op in (":-", ":?"):
            return env.get(name) or default
        if op in ("-", "?"):
            return env.get(name, default)
        return env.get(name, "")

    parts = value.split("$$")
    return "$".join(_INTERPOLATION.sub(sub, part) for part in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    """A service's environment with compose's defaults filled in."""
    env = compose["services"][name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def command(compose: dict[str, Any], name: str) -> list[str]:
    cmd = compose["services"][name]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def local_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without MPQ_* variables, plus ``extra``; the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPQ_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def as_local(cmd: list[str]) -> list[str]:
    """A container command run with this interpreter (``python`` -> sys.executable,
    ``celery`` -> ``python -m celery``)."""
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    if cmd[0] == "celery":
        return [sys.executable, "-m", "celery", *cmd[1:]]
    raise AssertionError(f"unexpected executable {cmd[0]!r}")


# --- docker-compose.yml: structure ------------------------------------------------------------


def test_compose_has_the_production_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "seaweedfs", *MPQ_SERVICES}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")
    weed = command(compose, "seaweedfs")
    assert weed[0] == "server" and "-s3" in weed
    for name in MPQ_SERVICES:
        assert "build" in services[name], f"{name} is built from the Dockerfile"
    for name in ("postgres", "redis", "seaweedfs"):
        assert "healthcheck" in services[name], name


def test_migrate_runs_once_before_api_and_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert command(compose, "migrate") == ["python", "-m", "mpq_service.migrate", "upgrade"]
    assert services["migrate"].get("restart", "no") == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["seaweedfs"]["condition"] == "service_healthy", name


def test_worker_reserves_one_gpu_and_runs_prefork_with_one_child(
    compose: dict[str, Any],
) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = command(compose, "worker")
    assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert cmd[cmd.index("--pool") + 1] == "prefork"
    assert cmd[cmd.index("--concurrency") + 1] == "1"


def test_worker_requires_the_sandbox_and_may_create_its_namespaces(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    assert service_env(compose, "worker")["MPQ_SANDBOX"] == "required"
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(worker["security_opt"])
    assert "security_opt" not in compose["services"]["api"]


def test_api_serves_the_factory_on_8000_with_a_readyz_healthcheck(
    compose: dict[str, Any],
) -> None:
    api = compose["services"]["api"]
    cmd = command(compose, "api")
    assert cmd[:5] == ["python", "-m", "uvicorn", "--factory", "api.app:create_app"]
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "8000:8000" in [str(p) for p in api["ports"]]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and "http://127.0.0.1:8000/readyz" in " ".join(test)


# --- docker-compose.yml: configuration ---------------------------------------------------------


def test_mpq_services_are_configured_only_by_real_settings(compose: dict[str, Any]) -> None:
    for name in MPQ_SERVICES:
        env = service_env(compose, name)
        assert env, name
        assert set(env) <= SETTINGS_VARS, (name, sorted(set(env) - SETTINGS_VARS))
    # Every MPQ_* name anywhere in the file (interpolations included) is a setting.
    used = set(re.findall(r"\bMPQ_[A-Z0-9_]+", COMPOSE.read_text()))
    assert used <= SETTINGS_VARS, sorted(used - SETTINGS_VARS)


def test_compose_settings_validate_as_production(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = [service_env(compose, name) for name in MPQ_SERVICES]
    assert envs[0] == envs[1] == envs[2], "migrate, api and worker share one configuration"
    for key in list(os.environ):
        if key.startswith("MPQ_"):
            monkeypatch.delenv(key)
    for key, value in envs[0].items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.database_url.startswith("postgresql://") and "@postgres:5432/" in (
        settings.database_url
    )
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.storage == "s3" and settings.s3_bucket
    assert settings.s3_endpoint_url == "http://seaweedfs:8333"
    assert settings.job_time_limit_s > 0 and settings.job_max_attempts >= 1
    assert settings.api_key_pepper.get_secret_value()


def test_seaweedfs_identity_matches_the_services_keys(compose: dict[str, Any]) -> None:
    service = compose["services"]["seaweedfs"]
    cmd = command(compose, "seaweedfs")
    config_path = next(a.split("=", 1)[1] for a in cmd if a.startswith("-s3.config="))
    mounted = {c["target"]: c["source"] for c in service["configs"]}
    doc = json.loads(interpolate(compose["configs"][mounted[config_path]]["content"]))
    env = service_env(compose, "api")
    credentials = [c for ident in doc["identities"] for c in ident["credentials"]]
    assert {"accessKey": env["MPQ_S3_ACCESS_KEY"], "secretKey": env["MPQ_S3_SECRET_KEY"]} in (
        credentials
    )
    port = next(a.split("=", 1)[1] for a in cmd if a.startswith("-s3.port="))
    assert env["MPQ_S3_ENDPOINT_URL"] == f"http://seaweedfs:{port}"


@pytest.mark.s3  # runs the weed binary
def test_seaweedfs_flags_exist_in_weed() -> None:
    from tests.support.s3server import weed_binary

    doc = yaml.safe_load(COMPOSE.read_text())
    flags = {a.split("=", 1)[0] for a in command(doc, "seaweedfs")[1:]}
    help_text = subprocess.run(
        [weed_binary(), "server", "-h"], capture_output=True, text=True, timeout=30
    )
    listed = set(re.findall(r"^\s+(-[\w.]+)", help_text.stdout + help_text.stderr, re.M))
    assert flags <= listed, sorted(flags - listed)


# --- the services' commands, run outside containers --------------------------------------------


def test_api_factory_builds_with_the_compose_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app

    for key in list(os.environ):
        if key.startswith("MPQ_"):
            monkeypatch.delenv(key)
    for key, value in service_env(compose, "api").items():
        monkeypatch.setenv(key, value)
    app = create_app()  # no I/O until it starts: no server is contacted here
    paths = {getattr(r, "path", None) for r in app.routes}
    assert {"/readyz", "/healthz", "/docs"} <= paths


def test_worker_app_resolves_with_the_compose_settings(compose: dict[str, Any]) -> None:
    cmd = as_local(command(compose, "worker"))
    app_arg = cmd[cmd.index("-A") + 1]
    probe = (
        "import importlib, sys; "
        f"m = importlib.import_module({app_arg!r}); app = m.app; "
        "import worker.tasks; "
        "print(app.conf.broker_url, app.conf.task_default_queue, "
        "app.conf.worker_prefetch_multiplier, app.conf.task_acks_late, "
        "'mpq.run_job' in app.tasks)"
    )
    env = local_env({**service_env(compose, "worker"), "MPQ_DATA_DIR": "/nonexistent/mpq"})
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["redis://redis:6379/0", "mpq", "1", "True", "True"]


def test_migrate_command_upgrades_a_database(compose: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / "mpq.db"
    env = local_env({"MPQ_DATABASE_URL": f"sqlite:///{db}", "MPQ_DATA_DIR": str(tmp_path)})
    out = subprocess.run(
        as_local(command(compose, "migrate")),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert version and {"jobs", "api_keys"} <= tables, tables


@pytest.fixture
def served_api(compose: dict[str, Any], tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """The api service's command (host and port changed) on SQLite and local storage."""
    env = local_env(
        {
            "MPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'mpq.db'}",
            "MPQ_DATA_DIR": str(tmp_path / "data"),
        }
    )
    migrated = subprocess.run(
        as_local(command(compose, "migrate")), cwd=tmp_path, env=env, capture_output=True
    )
    assert migrated.returncode == 0, migrated.stderr

    def api_command(port: int) -> list[str]:
        cmd = as_local(command(compose, "api"))
        cmd[cmd.index("--port") + 1] = str(port)
        cmd[cmd.index("--host") + 1] = "127.0.0.1"
        return cmd

    proc, base_url = start_http_service(
        "api", api_command, env=env, cwd=tmp_path, log_path=tmp_path / "api.log"
    )
    try:
        yield int(base_url.rsplit(":", 1)[1]), env
    finally:
        proc.stop()


def test_api_command_serves_and_its_healthcheck_passes(
    compose: dict[str, Any], served_api: tuple[int, dict[str, str]]
) -> None:
    port, env = served_api
    test = compose["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    check = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in test[1:]]
    ok = subprocess.run(as_local(check), env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # ...and it fails when the API is not there.
    dead = [a.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}") for a in test[1:]]
    bad = subprocess.run(as_local(dead), env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0


# --- Dockerfile and .dockerignore ---------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    assert not buf, "a dangling line continuation"
    out = []
    for line in joined:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_user_install_and_cmd() -> None:
    instr = dockerfile_instructions()
    assert instr[0] == ("FROM", "python:3.11-slim")
    kinds = [k for k, _ in instr]
    users = [v for k, v in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    runs = [v for k, v in instr if k == "RUN"]
    assert any("pip install" in r and ".[service]" in r for r in runs), runs
    assert any("useradd" in r and users[-1].split(":")[0] in r for r in runs)
    cmd = json.loads(next(v for k, v in instr if k == "CMD"))
    assert cmd[:5] == ["python", "-m", "uvicorn", "--factory", "api.app:create_app"]
    module, _, attr = cmd[4].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_dockerfile_torch_default_meets_the_package_requirement() -> None:
    import tomllib

    args = dict(v.split("=", 1) for k, v in dockerfile_instructions() if k == "ARG" and "=" in v)
    spec = args["TORCH_SPEC"].strip('"')
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert spec in deps, (spec, deps)
    assert any("TORCH_SPEC" in v for k, v in dockerfile_instructions() if k == "RUN")


def test_dockerfile_copies_what_exists_and_no_secrets() -> None:
    instr = dockerfile_instructions()
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    copied = []
    for kind, args in instr:
        if kind == "COPY":
            *sources, _dest = args.split()
            copied += [s for s in sources if not s.startswith("--")]
    assert {"pyproject.toml", "mpq_core", "mpq_service", "api", "worker", "migrations"} <= set(
        copied
    )
    for source in copied:
        assert (REPO / source).exists(), source
        assert source not in ignored, source
    for kind, args in instr:
        if kind in ("ENV", "ARG"):
            names = set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", args)) | {args.split("=")[0]}
            assert not {n for n in names if re.search("SECRET|PASSWORD|PEPPER|TOKEN", n)}, args
            for name in names:
                if name.startswith("MPQ_"):
                    assert name in SETTINGS_VARS, name


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", "bench/work", "mpq-data", ".env", ".git"} <= ignored
    assert {".mypy_cache", ".ruff_cache", ".pytest_cache", "**/__pycache__"} <= ignored
