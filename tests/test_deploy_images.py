"""The Dockerfile's two images, checked without a Docker engine: parsed, and the API image's
package set resolved and run here (the API, the migration and ``mpq keys create`` with only
those packages importable; torch never)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grimp
import pytest
import tomllib

from tests.support.api_image import (
    api_requirement_lines,
    installed_closure,
    normalize,
    write_import_guard,
)
from tests.support.compose_file import REPO, as_local, command, load_compose, local_env
from tests.support.net import free_port
from tests.support.processes import start_http_service

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
FIRST_PARTY = ("mpq_core", "mpq_service", "api", "worker")
#: An exact version: major.minor at least, or a digest; never a moving tag.
PINNED = re.compile(r"^[\w./-]+(:\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    assert not buf, "a dangling line continuation"
    return [(w.upper(), rest.strip()) for w, _, rest in (line.partition(" ") for line in joined)]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each ``FROM ... AS name`` stage's instructions (its FROM first)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for kind, args in dockerfile_instructions():
        if kind == "FROM":
            name = args.partition(" AS ")[2]
            current = out.setdefault(name.strip(), [])
        assert current is not None or kind == "ARG", f"{kind} before the first FROM"
        if current is not None:
            current.append((kind, args))
    return out


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    args = {}
    for kind, value in dockerfile_instructions():
        if kind == "FROM":
            break
        name, _, default = value.partition("=")
        args[name] = default.strip('"')
    return args


def runs(stage: str) -> list[str]:
    return [v for k, v in stages()[stage] if k == "RUN"]


def copied(stage: str) -> list[str]:
    sources = []
    for kind, args in stages()[stage]:
        if kind == "COPY":
            *srcs, _dest = args.split()
            sources += [s for s in srcs if not s.startswith("--")]
    return sources


# --- structure ----------------------------------------------------------------------------------


def test_two_targets_on_one_pinned_base() -> None:
    found = stages()
    assert {"api", "worker"} <= set(found), set(found)
    image = global_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    for name, instructions in found.items():
        base = instructions[0][1].split(" AS ")[0]
        assert base in ("${PYTHON_IMAGE}", "base"), (name, base)
        if name in ("api", "worker"):
            users = [v for k, v in instructions if k == "USER"]
            assert users and users[-1].split(":")[0] not in ("root", "0"), name


def test_every_pip_install_is_constrained() -> None:
    installs = [r for r in (*runs("base"), *runs("api"), *runs("worker")) if "pip install" in r]
    assert len(installs) >= 3
    for run in installs:
        for part in run.split("&&"):
            if "pip install" in part:
                assert "-c constraints.txt" in part, part
    assert "constraints.txt" in copied("base")


def test_the_api_target_installs_no_torch() -> None:
    api_runs = " ".join(runs("api"))
    assert "torch" not in api_runs and ".[service]" not in api_runs
    assert "python deploy/api_requirements.py pyproject.toml" in api_runs
    assert re.search(r"pip install -c constraints.txt --no-deps -e \.(\s|$)", api_runs), api_runs
    assert "worker" not in copied("api"), "the API image runs no worker"


def test_the_worker_target_installs_torch_then_the_package() -> None:
    worker = runs("worker")
    torch_at = next(i for i, r in enumerate(worker) if re.search(r"\btorch\b", r))
    package_at = next(i for i, r in enumerate(worker) if '-e ".[service]"' in r)
    assert torch_at < package_at
    assert {"mpq_core", "mpq_service", "worker", "migrations"} <= set(copied("worker"))


def test_each_target_runs_the_compose_command_by_default() -> None:
    compose = load_compose()
    cmds = {
        name: json.loads(next(v for k, v in reversed(stages()[name]) if k == "CMD"))
        for name in ("api", "worker")
    }
    assert cmds["api"] == command(compose, "api")
    assert cmds["worker"] == command(compose, "worker-cpu")


def test_dockerfile_copies_what_exists_and_no_secrets() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for stage in stages():
        for source in copied(stage):
            assert (REPO / source).exists(), source
            assert source not in ignored, source
    settings_vars = _settings_vars()
    for kind, args in dockerfile_instructions():
        if kind in ("ENV", "ARG"):
            names = set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", args)) | {args.split("=")[0]}
            assert not {n for n in names if re.search("SECRET|PASSWORD|PEPPER|TOKEN", n)}, args
            assert {n for n in names if n.startswith("MPQ_")} <= settings_vars, args


def _settings_vars() -> set[str]:
    from mpq_service.settings import Settings

    return {f"MPQ_{name.upper()}" for name in Settings.model_fields}


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", "bench/work", "mpq-data", ".env", ".env.*", ".git"} <= ignored
    assert {".mypy_cache", ".ruff_cache", ".pytest_cache", "**/__pycache__"} <= ignored


# --- the API image's packages -------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_packages() -> set[str]:
    """Every distribution the API image gets (the package itself, mpq, included)."""
    return installed_closure(api_requirement_lines()) | {"mpq"}


def test_api_requirements_are_pyprojects_own_lines_without_torch(api_packages: set[str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = api_requirement_lines()
    assert set(lines) <= {*project["dependencies"], *project["optional-dependencies"]["service"]}
    assert set(project["optional-dependencies"]["service"]) <= set(lines)
    assert "torch" not in api_packages
    assert not {p for p in api_packages if p.startswith(("nvidia-", "triton"))}, api_packages


def test_api_packages_cover_every_import_of_the_api_and_the_service_core(
    api_packages: set[str],
) -> None:
    """Every import statement reachable from api/ and mpq_service/ (function bodies too) names
    the standard library, the repository, or a distribution of the API image."""
    from importlib import metadata

    graph = grimp.build_graph(
        *FIRST_PARTY, include_external_packages=True, exclude_type_checking_imports=True
    )
    reached: set[str] = set()
    for module in graph.modules:
        if module.split(".")[0] in ("api", "mpq_service"):
            reached |= graph.find_upstream_modules(module) | {module}
    owners = metadata.packages_distributions()
    outside = {}
    for top in {m.split(".")[0] for m in reached} - set(FIRST_PARTY):
        if top in sys.stdlib_module_names:
            continue
        dists = {normalize(d) for d in owners.get(top, [top])}
        if not dists & api_packages:
            outside[top] = sorted(dists)
    assert not outside, f"imported by the API but not in its image: {outside}"


@pytest.fixture(scope="module")
def api_image_env(api_packages: set[str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``local_env`` whose Python imports only the API image's packages."""
    absent = set(FIRST_PARTY) - set(copied("api"))
    guard = write_import_guard(tmp_path_factory.mktemp("api-image"), api_packages, absent)

    def env(extra: dict[str, str]) -> dict[str, str]:
        out = local_env(extra)
        out["PYTHONPATH"] = f"{guard}:{out['PYTHONPATH']}"
        return out

    return env


def test_the_import_guard_refuses_torch_and_the_worker(api_image_env: Any) -> None:
    for module in ("torch", "worker.tasks"):
        out = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            env=api_image_env({}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0 and "in the api image" in out.stderr, (module, out.stderr)


def test_migrate_and_keys_create_run_with_only_the_api_images_packages(
    api_image_env: Any, tmp_path: Path
) -> None:
    compose = load_compose()
    env = api_image_env(
        {"MPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'mpq.db'}", "MPQ_DATA_DIR": str(tmp_path)}
    )
    migrated = subprocess.run(
        as_local(command(compose, "migrate")), cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    created = subprocess.run(
        as_local(["mpq", "keys", "create", "ops"]), cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().startswith("mpq_"), created.stdout


@pytest.fixture
def served_api(api_image_env: Any, tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """The api service's command (host and port changed) on SQLite and local storage, with only
    the API image's packages importable."""
    compose = load_compose()
    env = api_image_env(
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
    served_api: tuple[int, dict[str, str]],
) -> None:
    port, env = served_api
    test = load_compose()["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    check = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in test[1:]]
    ok = subprocess.run(as_local(check), env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    # ...and it fails when the API is not there.
    dead = [a.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}") for a in test[1:]]
    bad = subprocess.run(as_local(dead), env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0
