"""The API process imports the pure parts of mpq_core and must never pull in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "mpq_core",
    "mpq_core.errors",
    "mpq_core.layers",
    "mpq_core.sensitivity_table",
    "mpq_core.budgets",
    "mpq_core.solvers",
    "mpq_core.allocation",
    "mpq_core.spec",
    "mpq_core.sweep_plan",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"{module} imported torch"
