"""Round trips of every model on SQLite and Postgres, migrated by Alembic."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from mpq_core.spec import JobSpec
from mpq_service import storage_keys
from mpq_service.db import make_engine, normalize_url, session_scope
from mpq_service.job_status import JobStatus
from mpq_service.tables import (
    ApiKey,
    Artifact,
    Base,
    Dataset,
    Job,
    ModelFile,
    SensitivityCache,
    Tenant,
    new_id,
    utcnow,
)


def _tenant(session: Session) -> Tenant:
    tenant = Tenant(name=f"tenant-{uuid.uuid4().hex[:12]}")
    session.add(tenant)
    session.flush()
    return tenant


def _model(tenant: Tenant) -> ModelFile:
    model_id = new_id()
    return ModelFile(
        id=model_id,
        tenant_id=tenant.id,
        filename="net.pt",
        format="torchscript",
        size=12_345_678_901,  # past 2**32: BigInteger
        sha256="a" * 64,
        storage_key=storage_keys.model_key(tenant.id, model_id),
    )


def _dataset(tenant: Tenant, name: str = "calib.npz") -> Dataset:
    dataset_id = new_id()
    return Dataset(
        id=dataset_id,
        tenant_id=tenant.id,
        filename=name,
        format="npz",
        size=1024,
        sha256="b" * 64,
        storage_key=storage_keys.dataset_key(tenant.id, dataset_id),
    )


def _job(session: Session, tenant: Tenant, **fields: object) -> Job:
    model, data = _model(tenant), _dataset(tenant)
    session.add_all([model, data])
    session.flush()
    job = Job(
        tenant_id=tenant.id,
        model_id=model.id,
        dataset_id=data.id,
        spec=JobSpec(budgets=["avg-bits=3"]).to_dict(),
        **fields,
    )
    session.add(job)
    session.flush()
    return job


def test_every_model_round_trips(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as s:
        tenant = _tenant(s)
        key = ApiKey(tenant_id=tenant.id, name="ci", prefix="mpq_abcd", hash="c" * 64)
        model, data, evald = _model(tenant), _dataset(tenant), _dataset(tenant, "eval.npz")
        s.add_all([key, model, data, evald])
        s.flush()
        job = Job(
            tenant_id=tenant.id,
            model_id=model.id,
            dataset_id=data.id,
            eval_dataset_id=evald.id,
            spec={"budgets": ["avg-bits=4"]},
            result={"bits": {"conv1": 8, "fc": 2}, "loss_increase": 0.125},
            sensitivity_key="d" * 64,
        )
        s.add(job)
        s.flush()
        s.add(
            Artifact(
                job_id=job.id,
                tenant_id=tenant.id,
                name="model.pt",
                size=10,
                sha256="e" * 64,
                storage_key="artifacts/x/model.pt",
            )
        )
        cache_key = SensitivityCache.make_key("a" * 64, "b" * 64, {"method": "fisher"})
        s.add(SensitivityCache(tenant_id=tenant.id, key=cache_key, storage_key="sens/x.json"))
        ids = (tenant.id, key.id, model.id, data.id, job.id)

    tenant_id, key_id, model_id, data_id, job_id = ids
    with session_factory() as s:
        tenant = s.get_one(Tenant, tenant_id)
        assert tenant.created_at.tzinfo is not None
        assert [k.id for k in tenant.api_keys] == [key_id]
        assert s.get_one(ApiKey, key_id).revoked_at is None
        model = s.get_one(ModelFile, model_id)
        assert (model.format, model.size) == ("torchscript", 12_345_678_901)
        assert s.get_one(Dataset, data_id).filename == "calib.npz"
        job = s.get_one(Job, job_id)
        assert job.status == JobStatus.QUEUED
        assert (job.progress, job.attempts, job.stage, job.error_code) == (0.0, 0, None, None)
        assert job.result == {"bits": {"conv1": 8, "fc": 2}, "loss_increase": 0.125}
        assert job.model.id == model_id and job.eval_dataset is not None
        assert job.updated_at.tzinfo is not None
        assert [a.name for a in job.artifacts] == ["model.pt"]
        assert job.artifacts[0].content_type == "application/octet-stream"
        cached = s.scalars(
            select(SensitivityCache).where(SensitivityCache.tenant_id == tenant_id)
        ).one()
        assert cached.key == cache_key and len(cache_key) == 64


def test_job_spec_json_round_trips(session_factory: sessionmaker[Session]) -> None:
    spec = JobSpec(budgets=["avg-bits=3"]).to_dict()
    with session_scope(session_factory) as s:
        job_id = _job(s, _tenant(s)).id
    with session_factory() as s:
        stored = s.get_one(Job, job_id).spec
    assert stored == spec
    assert JobSpec.from_dict(stored) == JobSpec(budgets=["avg-bits=3"])


def test_timestamps_are_utc_aware(session_factory: sessionmaker[Session]) -> None:
    started = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(session_factory) as s:
        job_id = _job(s, _tenant(s), started_at=started, status=JobStatus.RUNNING).id
    with session_factory() as s:
        job = s.get_one(Job, job_id)
    assert job.status == "running" and JobStatus(job.status) is JobStatus.RUNNING
    assert job.started_at == started
    assert job.started_at is not None and job.started_at.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex}", created_at=datetime(2024, 1, 1))
        s.add(tenant)
        with pytest.raises(Exception, match="naive datetime"):
            s.flush()


def test_artifacts_are_deleted_with_their_job(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as s:
        tenant = _tenant(s)
        job = _job(s, tenant)
        for name in ("model.pt", "report.json"):
            s.add(
                Artifact(
                    job_id=job.id,
                    tenant_id=tenant.id,
                    name=name,
                    size=1,
                    sha256="f" * 64,
                    storage_key=f"a/{name}",
                )
            )
        job_id = job.id
    # A bulk DELETE bypasses the ORM cascade: the database's ON DELETE CASCADE must do it.
    with session_scope(session_factory) as s:
        s.execute(delete(Job).where(Job.id == job_id))
    with session_factory() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


def test_orm_delete_of_a_job_removes_its_artifacts(
    session_factory: sessionmaker[Session],
) -> None:
    with session_scope(session_factory) as s:
        tenant = _tenant(s)
        job = _job(s, tenant)
        s.add(
            Artifact(
                job_id=job.id,
                tenant_id=tenant.id,
                name="a",
                size=1,
                sha256="0" * 64,
                storage_key="k",
            )
        )
        job_id = job.id
    with session_scope(session_factory) as s:
        s.delete(s.get_one(Job, job_id))
    with session_factory() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


@pytest.mark.parametrize("model", [ApiKey, ModelFile, Dataset, Job, Artifact, SensitivityCache])
def test_tenant_id_is_required(session_factory: sessionmaker[Session], model: type[Base]) -> None:
    assert Base.metadata.tables[model.__tablename__].c.tenant_id.nullable is False
    with session_factory() as s:
        tenant = _tenant(s)
        job = _job(s, tenant)
        values: dict[type[Base], dict[str, Any]] = {
            ApiKey: {"name": "k", "prefix": "mpq_zzzz", "hash": uuid.uuid4().hex * 2},
            ModelFile: {
                c: getattr(job.model, c)
                for c in ("filename", "format", "size", "sha256", "storage_key")
            },
            Dataset: {
                c: getattr(job.dataset, c)
                for c in ("filename", "format", "size", "sha256", "storage_key")
            },
            Job: {"model_id": job.model_id, "dataset_id": job.dataset_id, "spec": {}},
            Artifact: {
                "job_id": job.id,
                "name": "x",
                "size": 1,
                "sha256": "0" * 64,
                "storage_key": "k",
            },
            SensitivityCache: {"key": "1" * 64, "storage_key": "k"},
        }
        s.add(model(tenant_id=None, **values[model]))
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()


def test_check_constraints(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s:
        tenant = _tenant(s)
        job = _job(s, tenant)
        job.status = "exploded"
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
    with session_factory() as s:
        bad = _model(_tenant(s))
        bad.format = "pickle"
        s.add(bad)
        with pytest.raises(IntegrityError):
            s.flush()


def test_sensitivity_cache_key_is_unique_per_tenant(
    session_factory: sessionmaker[Session],
) -> None:
    key = SensitivityCache.make_key("1" * 64, "2" * 64, {"method": "fisher", "seed": 0})
    with session_scope(session_factory) as s:
        first, second = _tenant(s), _tenant(s)
        s.add(SensitivityCache(tenant_id=first.id, key=key, storage_key="a"))
        s.add(SensitivityCache(tenant_id=second.id, key=key, storage_key="b"))
    with session_factory() as s:
        s.add(SensitivityCache(tenant_id=first.id, key=key, storage_key="c"))
        with pytest.raises(IntegrityError):
            s.flush()


def test_sensitivity_key_is_canonical() -> None:
    a = SensitivityCache.make_key("1" * 64, "2" * 64, {"method": "fisher", "seed": 0})
    b = SensitivityCache.make_key("1" * 64, "2" * 64, {"seed": 0, "method": "fisher"})
    c = SensitivityCache.make_key("1" * 64, "2" * 64, {"seed": 1, "method": "fisher"})
    assert a == b != c


def test_history_is_newest_first_per_tenant(session_factory: sessionmaker[Session]) -> None:
    base = utcnow()
    with session_scope(session_factory) as s:
        mine, other = _tenant(s), _tenant(s)
        for i in range(3):
            _job(s, mine, created_at=base + timedelta(seconds=i), stage=f"s{i}")
        _job(s, other, created_at=base + timedelta(seconds=10))
        mine_id = mine.id
    with session_factory() as s:
        stages = s.scalars(
            select(Job.stage)
            .where(Job.tenant_id == mine_id)
            .order_by(Job.created_at.desc(), Job.id.desc())
        ).all()
    assert stages == ["s2", "s1", "s0"]


def test_session_scope_rolls_back_on_error(session_factory: sessionmaker[Session]) -> None:
    name = f"t-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError), session_scope(session_factory) as s:
        s.add(Tenant(name=name))
        s.flush()
        raise RuntimeError("boom")
    with session_factory() as s:
        assert s.scalars(select(Tenant).where(Tenant.name == name)).first() is None


def test_sqlite_engine_settings(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        assert engine.dialect.driver == "psycopg"
        return
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_engine_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "x.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    assert path.exists()


def test_postgres_urls_use_psycopg3() -> None:
    for url in ("postgresql://u:p@h:5432/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        assert normalize_url(url).drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_a_job_status_reads_as_its_value_in_text() -> None:
    # Pages and messages format statuses with f-strings and templates.
    assert [f"{s}" for s in JobStatus] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert str(JobStatus.CANCELLED) == JobStatus.CANCELLED.value
