"""Count how the API answers the hostile-input corpus of tests/api/test_hostile_inputs.py.

Run: ``python -m bench.hostile_corpus``. Sends every case once to the real app (TestClient, the
errors a route raises answered as the server would: 500 ``internal_error``) on a fresh SQLite
database and on a fresh Postgres database (``MPQ_TEST_POSTGRES_URL``'s server), and prints, per
backend: cases, responses of class 5xx (or holding ``internal_error``), and answers whose status
or code differ from the corpus's expectation. Writes ``bench/results/hostile_corpus.json``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.api import test_hostile_inputs as corpus
from tests.api.apptools import model_and_dataset, running_service
from tests.support.postgres import admin_engine, create_database, drop_database

RESULTS = Path(__file__).parent / "results" / "hostile_corpus.json"


@contextmanager
def _database(backend: str) -> Iterator[dict[str, Any]]:
    if backend == "sqlite":
        yield {}
        return
    admin = admin_engine()
    url = create_database(admin)
    try:
        yield {"database_url": url}
    finally:
        drop_database(admin, url)
        admin.dispose()


def _wrong(case: corpus.Case, response: Any) -> bool:
    if response.status_code != case.status:
        return True
    if case.code is None:
        return False
    return bool(response.json().get("error", {}).get("code") != case.code)


def count(backend: str) -> dict[str, Any]:
    """One pass of the corpus on ``backend``: the counts and the ids of the failing cases."""
    with (
        _database(backend) as overrides,
        tempfile.TemporaryDirectory() as tmp,
        running_service(Path(tmp), **overrides) as svc,
    ):
        svc.client._transport.raise_server_exceptions = False  # type: ignore[attr-defined]
        headers = svc.key("bench")
        model_id, data_id = model_and_dataset(svc, headers)
        tenant = corpus.Tenant(svc, headers, {"model": model_id, "data": data_id})
        answers = [(case, corpus._send(tenant, case)) for case in corpus.CORPUS]
    server = [c.id for c, r in answers if r.status_code >= 500 or "internal_error" in r.text]
    wrong = [c.id for c, r in answers if _wrong(c, r)]
    return {"cases": len(answers), "5xx": len(server), "5xx_cases": server, "wrong": len(wrong)}


def main() -> None:
    results = {backend: count(backend) for backend in corpus.BACKENDS}
    for backend, res in results.items():
        print(
            f"{backend}: {res['cases']} cases, {res['5xx']} answered 5xx/internal_error, "
            f"{res['wrong']} with another status or code than expected"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
