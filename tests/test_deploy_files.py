"""docker-compose.yml and .env.example, checked without a Docker engine: parsed and interpolated
as compose does, and the commands of the services run outside containers (the same modules,
factories, flags and healthchecks). The Dockerfile's images: tests/test_deploy_images.py."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomllib

from mpq_service.settings import Settings
from tests.support.compose_file import (
    COMPOSE,
    REPO,
    TEST_SECRETS,
    MissingVariable,
    as_local,
    command,
    env_example,
    interpolate,
    load_compose,
    local_env,
    service_env,
)
from tests.support.processes import ServiceProcess

GPU_WORKERS = ("worker-gpu0", "worker-gpu1")
WORKERS = (*GPU_WORKERS, "worker-cpu")
MPQ_SERVICES = ("migrate", "api", *WORKERS)
#: What a worker's environment adds to the shared one: which GPU it sees.
DEVICE_VARS = {"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"}
SETTINGS_VARS = {f"MPQ_{name.upper()}" for name in Settings.model_fields}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


# --- services, images, profiles ----------------------------------------------------------------


def test_compose_has_the_production_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "seaweedfs", *MPQ_SERVICES}
    weed = command(compose, "seaweedfs")
    assert weed[0] == "server" and "-s3" in weed
    for name in MPQ_SERVICES:
        assert "build" in services[name], f"{name} is built from the Dockerfile"


def test_every_image_is_pinned_to_an_exact_version(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.split("@")[0].rpartition(":")[2]
        assert "@sha256:" in image or re.fullmatch(r"\d+\.\d+[\w.-]*", tag), (name, image)
        assert "latest" not in image, (name, image)
    images = {name: s["image"] for name, s in compose["services"].items()}
    assert images["postgres"].startswith("postgres:16.") and images["redis"].startswith("redis:7.")
    assert images["api"] == images["migrate"] == f"mpq-api:{VERSION}"
    assert {images[w] for w in WORKERS} == {f"mpq-worker:{VERSION}"}


def test_api_and_workers_build_their_own_targets(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("migrate", "api"):
        assert services[name]["build"] == {"context": ".", "target": "api"}, name
    for name in WORKERS:
        assert services[name]["build"] == {"context": ".", "target": "worker"}, name


def test_one_worker_per_gpu_each_pinned_to_its_own_device(compose: dict[str, Any]) -> None:
    seen = []
    for name in GPU_WORKERS:
        service = compose["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        (gpu,) = device["device_ids"]
        env = service_env(compose, name)
        # The reservation shows the container that one GPU only, as its device 0.
        assert env["NVIDIA_VISIBLE_DEVICES"] == gpu and env["CUDA_VISIBLE_DEVICES"] == "0", name
        assert name == f"worker-gpu{gpu}"
        assert service["profiles"] == ["gpu"], name
        seen.append(gpu)
    assert len(set(seen)) == len(seen) == len(GPU_WORKERS), seen


def test_cpu_worker_profile_sees_no_gpu(compose: dict[str, Any]) -> None:
    cpu = compose["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert service_env(compose, "worker-cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_only_workers_have_profiles_and_the_example_picks_gpu(compose: dict[str, Any]) -> None:
    """``docker compose up`` always starts storage, migration and API; the profile in .env
    (COMPOSE_PROFILES) adds the workers."""
    for name, service in compose["services"].items():
        assert ("profiles" in service) == (name in WORKERS), name
    assert env_example()["COMPOSE_PROFILES"] == "gpu"
    header = COMPOSE.read_text().split("\nname:")[0]
    assert "COMPOSE_PROFILES" in header and "--scale" in header


def test_workers_share_one_definition(compose: dict[str, Any]) -> None:
    services = compose["services"]
    first = services[WORKERS[0]]
    for name in WORKERS:
        worker = services[name]
        for key in ("command", "healthcheck", "security_opt", "mem_limit", "depends_on"):
            assert worker[key] == first[key], (name, key)
        cmd = command(compose, name)
        assert cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        assert cmd[cmd.index("--pool") + 1] == "prefork"
        assert cmd[cmd.index("--concurrency") + 1] == "1"
        shared = {k: v for k, v in service_env(compose, name).items() if k not in DEVICE_VARS}
        assert shared == service_env(compose, "api"), name


def test_workers_require_the_sandbox_and_may_create_its_namespaces(
    compose: dict[str, Any],
) -> None:
    for name in WORKERS:
        assert service_env(compose, name)["MPQ_SANDBOX"] == "required"
        opts = set(compose["services"][name]["security_opt"])
        assert {"seccomp=unconfined", "apparmor=unconfined"} <= opts
    assert "security_opt" not in compose["services"]["api"]


def test_migrate_runs_once_before_api_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert command(compose, "migrate") == ["python", "-m", "mpq_service.migrate", "upgrade"]
    assert services["migrate"].get("restart", "no") == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", *WORKERS):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["seaweedfs"]["condition"] == "service_healthy", name


def test_api_serves_the_factory_on_8000_with_a_readyz_healthcheck(
    compose: dict[str, Any],
) -> None:
    api = compose["services"]["api"]
    cmd = command(compose, "api")
    assert cmd[:3] == ["mpq", "serve", "--no-worker"]  # the workers are their own services
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "8000:8000" in [str(p) for p in api["ports"]]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and "http://127.0.0.1:8000/readyz" in " ".join(test)


# --- healthchecks, memory, logs -----------------------------------------------------------------


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name in ("postgres", "redis", "seaweedfs", "api", *WORKERS):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    worker_test = compose["services"]["worker-gpu0"]["healthcheck"]["test"]
    assert worker_test[1:4] == ["python", "-m", "worker.liveness"], worker_test


def _bytes(size: str) -> int:
    """Docker's memory sizes: 512m, 2g (b, k, m, g; binary units)."""
    match = re.fullmatch(r"(\d+)([bkmg])", size.lower())
    assert match, f"not a Docker memory size: {size!r}"
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2))


def test_every_service_has_a_memory_limit_and_rotated_logs(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        limit = _bytes(interpolate(str(service["mem_limit"]), {}))
        assert limit >= 256 * 2**20, (name, limit)
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert _bytes(logging["options"]["max-size"]) <= 100 * 2**20, name
        assert 1 <= int(logging["options"]["max-file"]) <= 10, name
    worker_limit = compose["services"]["worker-gpu0"]["mem_limit"]
    assert _bytes(interpolate(worker_limit, {"WORKER_MEM_LIMIT": "64g"})) == 64 * 2**30


# --- configuration and secrets ------------------------------------------------------------------


def test_mpq_services_are_configured_only_by_real_settings(compose: dict[str, Any]) -> None:
    for name in MPQ_SERVICES:
        env = set(service_env(compose, name)) - DEVICE_VARS
        assert env, name
        assert env <= SETTINGS_VARS, (name, sorted(env - SETTINGS_VARS))
    # Every MPQ_* name anywhere in the file (interpolations included) is a setting.
    used = set(re.findall(r"\bMPQ_[A-Z0-9_]+", COMPOSE.read_text()))
    assert used <= SETTINGS_VARS, sorted(used - SETTINGS_VARS)


def test_secrets_are_required_never_defaulted(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?[^}]+\}", text))
    assert required == set(TEST_SECRETS), required
    for name in re.findall(r"\$\{([A-Z0-9_]+)", text):
        if re.search("SECRET|PASSWORD|PEPPER|TOKEN", name):
            assert name in required, f"{name} has a default"
    # Compose stops when any one is missing, naming it.
    for secret in TEST_SECRETS:
        env = {k: v for k, v in TEST_SECRETS.items() if k != secret}
        with pytest.raises(MissingVariable, match=secret):
            for name in compose["services"]:
                service_env(compose, name, env)
        with pytest.raises(MissingVariable, match=secret):
            service_env(compose, "api", {**env, secret: ""})  # empty counts as missing
    with pytest.raises(MissingVariable, match="MPQ_S3_SECRET_KEY"):
        interpolate(compose["configs"]["seaweedfs-s3"]["content"], {})


def test_env_example_names_every_required_variable_and_holds_no_secret() -> None:
    example = env_example()
    for secret in TEST_SECRETS:
        assert example.get(secret, "missing") == "", secret
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_compose_settings_validate_as_production(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = service_env(compose, "api")
    for key in list(os.environ):
        if key.startswith("MPQ_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.database_url == (
        f"postgresql://mpq:{TEST_SECRETS['POSTGRES_PASSWORD']}@postgres:5432/mpq"
    )
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.storage == "s3" and settings.s3_bucket
    assert settings.s3_endpoint_url == "http://seaweedfs:8333"
    assert settings.job_time_limit_s > 0 and settings.job_max_attempts >= 1
    assert settings.api_key_pepper.get_secret_value() == TEST_SECRETS["MPQ_API_KEY_PEPPER"]
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == TEST_SECRETS["MPQ_WEBHOOK_SECRET"]


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
def test_seaweedfs_flags_exist_in_the_pinned_weed() -> None:
    from tests.support.s3server import weed_binary

    doc = load_compose()
    flags = {a.split("=", 1)[0] for a in command(doc, "seaweedfs")[1:]}
    weed = weed_binary()
    help_text = subprocess.run([weed, "server", "-h"], capture_output=True, text=True, timeout=30)
    listed = set(re.findall(r"^\s+(-[\w.]+)", help_text.stdout + help_text.stderr, re.M))
    assert flags <= listed, sorted(flags - listed)
    # The tests' weed is the image's version, so these flags are that version's.
    version = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30)
    tag = doc["services"]["seaweedfs"]["image"].split(":")[1]
    assert f" {tag} " in version.stdout, (tag, version.stdout)


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
    cmd = as_local(command(compose, "worker-gpu0"))
    app_arg = cmd[cmd.index("-A") + 1]
    probe = (
        "import importlib, sys; "
        f"m = importlib.import_module({app_arg!r}); app = m.app; "
        "import worker.tasks; "
        "print(app.conf.broker_url, app.conf.task_default_queue, "
        "app.conf.worker_prefetch_multiplier, app.conf.task_acks_late, "
        "'mpq.run_job' in app.tasks)"
    )
    env = local_env({**service_env(compose, "worker-gpu0"), "MPQ_DATA_DIR": "/nonexistent/mpq"})
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


def _healthcheck(compose: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    test = compose["services"]["worker-gpu0"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return subprocess.run(as_local(test[1:]), env=env, capture_output=True, text=True, timeout=60)


def test_worker_healthcheck_passes_while_the_worker_runs_and_fails_once_it_stops(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The worker's own command (on the file-system broker and SQLite), and its healthcheck."""
    env = local_env(
        {
            "MPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'mpq.db'}",
            "MPQ_DATA_DIR": str(tmp_path / "data"),
            "MPQ_BROKER_URL": "",
        }
    )
    before = _healthcheck(compose, env)
    assert before.returncode == 1 and "is missing" in before.stderr, before.stderr
    cmd = as_local(command(compose, "worker-cpu"))
    worker = ServiceProcess.start("worker", cmd, env=env, cwd=tmp_path, log_path=tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 90
        while (check := _healthcheck(compose, env)).returncode != 0:
            assert worker.alive() and time.monotonic() < deadline, (check.stderr, worker.describe())
            time.sleep(0.5)
    finally:
        assert worker.stop(timeout_s=30) is not None
    stopped = _healthcheck(compose, env)
    assert stopped.returncode == 1 and "is missing" in stopped.stderr, stopped.stderr


def test_worker_healthcheck_fails_on_a_stale_file_and_passes_on_a_fresh_one(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from worker.liveness import DEFAULT_MAX_AGE_S, alive_path

    env = local_env({"MPQ_DATA_DIR": str(tmp_path)})
    alive = alive_path(tmp_path)
    alive.touch()
    assert _healthcheck(compose, env).returncode == 0
    old = time.time() - 2 * DEFAULT_MAX_AGE_S
    os.utime(alive, (old, old))
    stale = _healthcheck(compose, env)
    assert stale.returncode == 1 and "last touched" in stale.stderr, stale.stderr
