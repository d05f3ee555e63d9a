"""Helpers for the route tests: a real app (migrated SQLite file, LocalStorage under tmp) served
by TestClient, API keys for tenants, and small upload bodies."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.auth import create_key
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from mpq_service.settings import Settings
from mpq_service.storage import LocalStorage
from tests.support.files import mlp_data_npz

PEPPER = "test-pepper"


@dataclass
class Service:
    """A running app and what the tests look at behind it."""

    client: TestClient
    settings: Settings
    storage: LocalStorage
    sessions: sessionmaker[Session]
    enqueued: list[str] = field(default_factory=list)

    def key(self, tenant: str) -> dict[str, str]:
        """Authorization headers with a fresh API key of ``tenant`` (created if new)."""
        with session_scope(self.sessions) as session:
            plaintext = create_key(session, tenant, "test", pepper=PEPPER)
        return {"Authorization": f"Bearer {plaintext}"}

    def stored_files(self) -> list[Path]:
        """Every object file in storage (temporary files of writes in progress excluded)."""
        root = self.storage.root
        return sorted(p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts)


@contextmanager
def running_service(tmp_path: Path, **overrides: Any) -> Iterator[Service]:
    """The app on a freshly migrated SQLite database and local storage under ``tmp_path``."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path / "data",
        api_key_pepper=SecretStr(PEPPER),
        **overrides,
    )
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    enqueued: list[str] = []
    app = create_app(settings, enqueue=enqueued.append)
    storage = app.state.storage
    assert isinstance(storage, LocalStorage)
    try:
        with TestClient(app) as client:
            yield Service(client, settings, storage, make_sessionmaker(engine), enqueued)
    finally:
        engine.dispose()


@functools.cache
def model_bytes() -> bytes:
    """A small TorchScript archive (made with torch once per test session)."""
    import torch

    from tests.zoo import SmallMLP, torchscript_bytes

    return torchscript_bytes(SmallMLP(), (torch.randn(2, 16),))


@functools.cache
def pickled_model_bytes() -> bytes:
    """A ``torch.save``-d module: a pickle the API must refuse."""
    import torch

    from tests.zoo import SmallMLP

    buf = io.BytesIO()
    torch.save(SmallMLP(), buf)
    return buf.getvalue()


def data_bytes(n: int = 32) -> bytes:
    """A calibration ``.npz`` with ``input`` and ``labels`` for :func:`model_bytes`."""
    return mlp_data_npz(n)


def upload(
    svc: Service, headers: dict[str, str], kind: str, body: bytes, filename: str
) -> dict[str, Any]:
    """Upload ``body`` to ``/v1/{kind}`` and return the created resource (asserting 201)."""
    r = svc.client.post(f"/v1/{kind}", params={"filename": filename}, content=body, headers=headers)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def model_and_dataset(svc: Service, headers: dict[str, str]) -> tuple[str, str]:
    """Ids of a freshly uploaded model and dataset of the key's tenant."""
    model = upload(svc, headers, "models", model_bytes(), "mlp.pt")
    data = upload(svc, headers, "datasets", data_bytes(), "calib.npz")
    return model["id"], data["id"]


SPEC = {"budgets": ["avg-bits=4"], "bits": [2, 4, 8], "finetune": {"epochs": 0}}
