"""docker-compose.yml read as compose reads it (interpolation included), and its container
commands turned into commands of this machine, for the tests of the deployment files."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"

#: The secrets compose requires, with stand-in values for the tests.
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-password",
    "MPQ_S3_SECRET_KEY": "s3-test-secret",
    "MPQ_API_KEY_PEPPER": "test-pepper",
    "MPQ_WEBHOOK_SECRET": "test-webhook-secret",
}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` (or ``${VAR?message}``) whose variable is not set: compose stops."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}`` and
    ``${VAR?message}`` with ``env`` (default: :data:`TEST_SECRETS`), ``$$`` an escaped dollar.
    A required variable that is missing raises :class:`MissingVariable` with its message."""
    env = TEST_SECRETS if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    parts = value.split("$$")
    return "$".join(_INTERPOLATION.sub(sub, part) for part in parts)


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def service_env(
    compose: dict[str, Any], name: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    """A service's environment as compose gives it, interpolated with ``env``."""
    values = compose["services"][name].get("environment") or {}
    if isinstance(values, list):
        values = dict(item.split("=", 1) for item in values)
    return {str(k): interpolate(str(v), env) for k, v in values.items()}


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
    ``celery`` -> ``python -m celery``, ``mpq`` -> ``python -m mpq_core.cli``)."""
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    if cmd[0] == "celery":
        return [sys.executable, "-m", "celery", *cmd[1:]]
    if cmd[0] == "mpq":
        return [sys.executable, "-m", "mpq_core.cli", *cmd[1:]]
    raise AssertionError(f"unexpected executable {cmd[0]!r}")


def env_example() -> dict[str, str]:
    """The variables .env.example sets (commented-out lines are only documentation)."""
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs
