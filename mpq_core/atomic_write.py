"""Artefact files written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["file_target", "write_atomic"]


def file_target(path: str | Path, default_name: str) -> Path:
    """``path``, or ``path/default_name`` when ``path`` is a directory."""
    p = Path(path)
    return p / default_name if p.is_dir() else p


def write_atomic(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so no half file is left."""
    # The temporary name keeps the target's suffix: torch.export.save warns about other names.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the artefact from other services
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
