"""The packages of the API image (Dockerfile target ``api``), and commands run here with only
those packages importable, as the image runs them.

The image installs the lines of ``deploy/api_requirements.py`` and the package with
``--no-deps``. :func:`installed_closure` follows those requirements through the metadata of the
packages installed here (what pip would install, at the versions CI tests);
:func:`write_import_guard` writes a ``sitecustomize`` that makes every other installed
distribution, and the first-party packages the image does not copy, unimportable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from tests.support.compose_file import REPO

__all__ = ["api_requirement_lines", "installed_closure", "normalize", "write_import_guard"]


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def api_requirement_lines() -> list[str]:
    """What the Dockerfile's api stage installs: the output of the same command."""
    out = subprocess.run(
        [sys.executable, "deploy/api_requirements.py", "pyproject.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


def _wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def installed_closure(requirements: list[str]) -> set[str]:
    """The normalized names of ``requirements`` and everything they require (extras and
    environment markers evaluated here), read from the installed distributions."""
    seen: set[str] = set()
    pending = [Requirement(line) for line in requirements]
    done_extras: dict[str, set[str]] = {}
    while pending:
        req = pending.pop()
        name = normalize(req.name)
        extras = set(req.extras)
        if name in seen and extras <= done_extras.get(name, set()):
            continue
        seen.add(name)
        done_extras.setdefault(name, set()).update(extras)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError as exc:
            raise AssertionError(f"{req.name} is not installed here: run make install") from exc
        for line in dist.requires or []:
            sub = Requirement(line)
            if _wanted(sub, extras):
                pending.append(sub)
    return seen


_GUARD = '''"""Written by tests/support/api_image.py: only the API image's packages import."""
import importlib.abc
import importlib.metadata
import re
import sys

_ALLOWED = set({allowed!r})
_ABSENT = set({absent!r})
_OWNERS = importlib.metadata.packages_distributions()


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


class _ApiImageOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        owners = _OWNERS.get(top) or []
        if top in _ABSENT or (owners and not any(_normalize(o) in _ALLOWED for o in owners)):
            raise ModuleNotFoundError(
                f"No module named {{top!r}} in the api image (from {{owners or 'this repo'}})",
                name=fullname,
            )
        return None


sys.meta_path.insert(0, _ApiImageOnly())
'''


def write_import_guard(folder: Path, allowed: set[str], absent: set[str]) -> Path:
    """Write ``folder/sitecustomize.py``: with ``folder`` first on ``PYTHONPATH``, a module of an
    installed distribution outside ``allowed``, or a top-level package in ``absent``, fails to
    import. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = _GUARD.format(allowed=sorted(allowed), absent=sorted(absent))
    (folder / "sitecustomize.py").write_text(text)
    return folder
