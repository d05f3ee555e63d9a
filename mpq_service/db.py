"""Engines and sessions for SQLite (embedded default) and Postgres (production).

Built by factories, never at import time: the app, the worker and tests each make their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_sessionmaker", "normalize_url", "session_scope"]


def normalize_url(url: str | URL) -> URL:
    """The URL with Postgres pinned to psycopg 3 (``postgresql://`` -> ``postgresql+psycopg://``).

    Example:
        >>> normalize_url("postgresql://u@h/db").drivername
        'postgresql+psycopg'
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _ensure_sqlite_dir(url: URL) -> None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite,
    # and the busy timeout makes a writer wait for another instead of failing at once.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An Engine for ``url``, configured for the backend.

    SQLite: usable from several threads, WAL journal, foreign keys enforced, parent folder
    created. Postgres: psycopg 3, pre-ping so connections dropped by a restart are replaced.

    Args:
        url: a SQLAlchemy URL; ``postgresql://`` is rewritten to use psycopg 3.
        **kwargs: passed on to ``sqlalchemy.create_engine``.

    Example:
        >>> engine = make_engine("sqlite:///./mpq-data/mpq.db")
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        _ensure_sqlite_dir(parsed)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits when the block ends, rolls back on error, and always closes.

    Example:
        >>> with session_scope(make_sessionmaker(engine)) as session:
        ...     session.add(Tenant(name="acme"))
    """
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
