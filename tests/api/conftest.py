"""Real databases for the api tests: a fresh SQLite file per test and fresh Postgres databases
(from tests/support/fixtures.py: ``pg_url``, ``new_pg_url``), migrated where asked, and a
Postgres behind a TCP proxy that a test can cut (an outage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from mpq_service.db import make_engine, make_sessionmaker
from mpq_service.migrate import upgrade
from tests.api.served import Served, served
from tests.support.tcp_proxy import TcpProxy

BACKENDS = ("sqlite", "postgres")


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


@pytest.fixture
def pg_behind_proxy(new_pg_url: Callable[[], str]) -> Iterator[tuple[TcpProxy, str, str]]:
    """A fresh Postgres database reached through a TCP proxy: (proxy, URL through the proxy,
    direct URL)."""
    direct = new_pg_url()
    parsed = make_url(direct)
    with TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432) as proxy:
        through = parsed.set(port=proxy.port).render_as_string(hide_password=False)
        yield proxy, through, direct


@pytest.fixture
def served_on_proxied_pg(
    tmp_path: Path, pg_behind_proxy: tuple[TcpProxy, str, str]
) -> Iterator[tuple[TcpProxy, Served]]:
    """``mpq serve --no-worker`` on the Postgres database behind the proxy (the key made
    directly): (the proxy, which the test may cut; the service)."""
    proxy, through, direct = pg_behind_proxy
    with served(tmp_path, database_url=through, key_database_url=direct) as api:
        yield proxy, api
