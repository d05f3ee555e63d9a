"""Fresh Postgres databases for tests, created on the server at ``MPQ_TEST_POSTGRES_URL``
(default: the local server's ``test`` database as user postgres) and dropped WITH (FORCE).

An unreachable server fails the tests that need it: it is part of the test environment, never
skipped. Tests that use it carry the ``postgres`` marker (see tests/conftest.py).
"""

from __future__ import annotations

import os
import secrets

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

__all__ = ["ADMIN_URL", "PostgresUnreachable", "admin_engine", "create_database", "drop_database"]

ADMIN_URL = os.environ.get(
    "MPQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class PostgresUnreachable(RuntimeError):
    pass


def admin_engine() -> Engine:
    """An AUTOCOMMIT engine on the admin database (for CREATE/DROP DATABASE), checked live."""
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        raise PostgresUnreachable(
            f"Postgres not reachable at {ADMIN_URL}: {exc.orig}; start it (see README)"
        ) from None
    return engine


def create_database(admin: Engine, prefix: str = "mpq_test") -> str:
    """Create an empty database with a random name; its URL (password included)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(admin: Engine, url: str) -> None:
    """Drop the database of ``url``, closing its remaining connections."""
    name = make_url(url).database
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
