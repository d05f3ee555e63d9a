"""The fixtures for real external services, loaded by tests/conftest.py for every test:
fresh Postgres databases, a claimed Redis database, the shared SeaweedFS S3 server.
Each fails (never skips) the test when its service is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from tests.support.postgres import (
    PostgresUnreachable,
    admin_engine,
    create_database,
    drop_database,
)
from tests.support.redis_db import RedisUnavailable, claimed_redis_db
from tests.support.s3server import s3_server

__all__ = ["new_pg_url", "pg_admin", "pg_url", "redis_url", "s3_server"]


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the admin database, for CREATE/DROP DATABASE."""
    try:
        engine = admin_engine()
    except PostgresUnreachable as exc:
        pytest.fail(str(exc))
    yield engine
    engine.dispose()


@pytest.fixture
def new_pg_url(pg_admin: Engine) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty Postgres databases (URLs), all dropped after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(create_database(pg_admin))
        return made[-1]

    yield make
    for url in made:
        drop_database(pg_admin, url)


@pytest.fixture(scope="module")
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A fresh, empty Postgres database shared by one test module."""
    url = create_database(pg_admin)
    yield url
    drop_database(pg_admin, url)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL of an empty Redis database claimed for this test alone; flushed afterwards."""
    try:
        with claimed_redis_db() as url:
            yield url
    except RedisUnavailable as exc:
        pytest.fail(str(exc))
