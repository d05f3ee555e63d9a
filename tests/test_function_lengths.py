"""No function of the engine or the service over 80 lines unless a comment right above it
says why."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mpq_core", "mpq_service", "api", "worker", "client/mpq_client")
LIMIT = 80
REASON = "# Over 80 lines on purpose"


def test_long_functions_give_their_reason() -> None:
    unexplained = []
    for path in sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            if node.end_lineno - node.lineno + 1 <= LIMIT:
                continue
            above = lines[max(0, node.lineno - 8) : node.lineno - 1]
            if not any(line.strip().startswith(REASON) for line in above):
                unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert unexplained == []
