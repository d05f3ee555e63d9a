"""Real databases for the api tests: a fresh SQLite file per test and fresh Postgres databases.

Postgres is reached at ``MPQ_TEST_POSTGRES_URL`` (default the local server, database ``test``);
each fresh database is created there and dropped (WITH (FORCE)) afterwards. An unreachable
server fails the tests that need it (it is part of the test environment, never skipped).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.db import make_engine, make_sessionmaker
from mpq_service.migrate import upgrade

ADMIN_URL = os.environ.get(
    "MPQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the admin database, for CREATE/DROP DATABASE."""
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        pytest.fail(f"Postgres not reachable at {ADMIN_URL}: {exc.orig}; start it (see README)")
    yield engine
    engine.dispose()


def _create_database(admin: Engine) -> str:
    name = f"mpq_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin: Engine, url: str) -> None:
    name = make_url(url).database
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def new_pg_url(pg_admin: Engine) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty Postgres databases (URLs), all dropped after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(_create_database(pg_admin))
        return made[-1]

    yield make
    for url in made:
        _drop_database(pg_admin, url)


@pytest.fixture(scope="module")
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh, empty Postgres database shared by one test module."""
    url = _create_database(pg_admin)
    yield url
    _drop_database(pg_admin, url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file (not yet created) under the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'mpq.db'}"


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """A fresh, empty database of the backend named by indirect parametrization."""
    if request.param == "sqlite":
        return sqlite_url
    make: Callable[[], str] = request.getfixturevalue("new_pg_url")
    return make()


@pytest.fixture(scope="module")
def migrated_pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on the module's Postgres database, migrated to head."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a database migrated to head, on each backend in turn."""
    if request.param == "postgres":
        yield request.getfixturevalue("migrated_pg_engine")
        return
    url = f"sqlite:///{tmp_path / 'mpq.db'}"
    upgrade(url)
    sqlite_engine = make_engine(url)
    yield sqlite_engine
    sqlite_engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A plain session; the test commits what it wants to persist."""
    with session_factory() as s:
        yield s
