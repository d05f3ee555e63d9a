"""The service markers set in tests/conftest.py select exactly the tests that need a server, so
``pytest -m "not postgres and not redis and not s3 and not browser"`` runs on a laptop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _collected(marker: str, *paths: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", marker, *paths],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: nothing selected
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_backend_parameters_mark_only_the_variants_that_reach_the_service() -> None:
    postgres = _collected("postgres", "tests/api/test_migrations.py")
    assert postgres and all("postgres" in test for test in postgres), postgres
    # test_plain_postgresql_url_is_accepted asks for new_pg_url directly: marked without a param
    assert any("test_plain_postgresql_url_is_accepted" in test for test in postgres)
    no_server = _collected("not postgres", "tests/api/test_migrations.py")
    assert no_server and not any("postgres" in test for test in no_server), no_server

    s3 = _collected("s3", "tests/api/test_storage.py")
    local = _collected("not s3", "tests/api/test_storage.py")
    assert any("[s3" in test for test in s3) and not any("[local" in test for test in s3), s3
    assert any("[local" in test for test in local) and not any("[s3" in test for test in local)


def test_service_fixtures_mark_the_full_stack_test_with_every_service_it_uses() -> None:
    path = "tests/integration/test_full_stack.py"
    for marker in ("postgres", "redis", "s3"):
        assert _collected(marker, path), f"the full-stack test is not marked {marker}"
    assert not _collected("not postgres", path)
