"""What importing something loads, seen from a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

__all__ = ["top_level_modules_after"]


def top_level_modules_after(statement: str) -> set[str]:
    """The top-level packages loaded in a fresh Python once ``statement`` has run."""
    code = f"{statement}\nimport sys\nprint(' '.join({{n.split('.')[0] for n in sys.modules}}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())
