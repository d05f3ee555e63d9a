"""Print the requirements of the API image, one per line: the ``service`` extra of
pyproject.toml and the few core dependencies the API imports, never torch.

The package's core dependencies include torch (the engine needs it), so the API image cannot
``pip install .[service]``: the Dockerfile installs these lines, then the package itself with
``--no-deps``. Versions stay written once, in pyproject.toml; tests/test_deploy_files.py checks
that the API and the migration run with only these distributions (and what they require).

    python deploy/api_requirements.py [pyproject.toml] > api-requirements.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: The core dependencies the API process imports (mpq_core.spec, budgets and solvers): numpy,
#: scipy and RE2 patterns. Not torch, nor anything that only the engine's jobs use.
API_CORE = ("numpy", "scipy", "google-re2")

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def api_requirements(pyproject: Path) -> list[str]:
    """The ``service`` extra, then the :data:`API_CORE` entries of ``dependencies``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_name(r): r for r in project["dependencies"]}
    missing = [name for name in API_CORE if name not in core]
    if missing:
        raise SystemExit(f"{pyproject}: no core dependency named {', '.join(missing)}")
    return [*project["optional-dependencies"]["service"], *(core[name] for name in API_CORE)]


def main(argv: list[str]) -> int:
    pyproject = Path(argv[1] if len(argv) > 1 else "pyproject.toml")
    print("\n".join(api_requirements(pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
