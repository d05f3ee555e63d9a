"""A migrated SQLite database, local storage and a tenant with an uploaded model and data set,
for running jobs without a broker (and for the one real-worker test)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from mpq_service import storage_keys
from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.migrate import upgrade
from mpq_service.settings import Settings
from mpq_service.storage import LocalStorage, Storage, make_storage
from mpq_service.tables import Dataset, Job, ModelFile, Tenant, new_id
from tests.conftest import zoo_data
from tests.support.files import npz_bytes
from worker.jobs import run_job

# Small and quick: the MLP of tests/zoo.py, 48 samples, one fine-tuning epoch.
SPEC: dict[str, Any] = {
    "budgets": ["avg-bits=4"],
    "batch_size": 16,
    "finetune": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
}


def mlp_npz(n: int = 48) -> bytes:
    data = zoo_data("mlp", n)
    assert data.labels is not None
    return npz_bytes(input=data.inputs[0].numpy(), labels=data.labels.numpy())


@dataclass
class Env:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: Storage
    workdir: Path
    tenant_id: str
    model_bytes: bytes

    def upload_model(self, body: bytes) -> str:
        return self._upload(ModelFile, storage_keys.model_key, body, "model.pt", "torchscript")

    def upload_data(self, body: bytes) -> str:
        return self._upload(Dataset, storage_keys.dataset_key, body, "calib.npz", "npz")

    def _upload(
        self,
        table: type[ModelFile | Dataset],
        key_of: Callable[[str, str], str],
        body: bytes,
        filename: str,
        fmt: str,
    ) -> str:
        """What the upload routes leave behind: the file in storage and its row."""
        row_id = new_id()
        key = key_of(self.tenant_id, row_id)
        self.storage.put_bytes(key, body)
        with session_scope(self.session_factory) as s:
            s.add(
                table(
                    id=row_id,
                    tenant_id=self.tenant_id,
                    filename=filename,
                    format=fmt,
                    size=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    storage_key=key,
                )
            )
        return row_id

    def create_job(
        self,
        *,
        model_id: str | None = None,
        dataset_id: str | None = None,
        spec: dict[str, Any] | None = None,
        **fields: Any,
    ) -> str:
        model_id = model_id or self.upload_model(self.model_bytes)
        dataset_id = dataset_id or self.upload_data(mlp_npz())
        with session_scope(self.session_factory) as s:
            job = Job(
                tenant_id=self.tenant_id,
                model_id=model_id,
                dataset_id=dataset_id,
                spec=dict(spec or SPEC),
                **fields,
            )
            s.add(job)
            s.flush()
            return job.id

    def run_job(self, job_id: str) -> Job:
        """One attempt of ``job_id`` with this environment (no broker), then the job's row."""
        run_job(
            job_id,
            settings=self.settings,
            session_factory=self.session_factory,
            storage=self.storage,
            workdir=self.workdir,
        )
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            assert job is not None
            _ = job.artifacts  # loaded while the session is open
            return job


@pytest.fixture
def make_env(
    tmp_path: Path, zoo_bytes: Callable[[str, str], bytes]
) -> Iterator[Callable[..., Env]]:
    engines: list[Engine] = []

    def make(**overrides: Any) -> Env:
        overrides.setdefault("database_url", f"sqlite:///{tmp_path / 'data' / 'mpq.db'}")
        settings = Settings(data_dir=tmp_path / "data", storage="local", **overrides)
        upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        engines.append(engine)
        factory = make_sessionmaker(engine)
        storage = make_storage(settings)  # type: ignore[arg-type]
        assert isinstance(storage, LocalStorage)
        storage.ensure_ready()
        with session_scope(factory) as s:
            tenant = Tenant(name="acme")
            s.add(tenant)
            s.flush()
            tenant_id = tenant.id
        return Env(
            settings=settings,
            engine=engine,
            session_factory=factory,
            storage=storage,
            workdir=tmp_path / "work",
            tenant_id=tenant_id,
            model_bytes=zoo_bytes("mlp", "script"),
        )

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()
