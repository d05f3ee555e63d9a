"""Apply the Alembic migrations in ``migrations/``, safely when several replicas start at once.

The Alembic Config is built in code (no ``alembic.ini``). Upgrades and downgrades run under a
cross-process lock, so of two API replicas (or a migration service and an API) starting
together, one migrates and the other waits, then finds the schema at head and does nothing:

- Postgres: ``pg_advisory_lock`` held on a dedicated connection around the migration.
- SQLite: ``fcntl.flock`` on a ``<database>.migrate.lock`` file next to the database.

Command line (uses ``MPQ_DATABASE_URL``)::

    python -m mpq_service.migrate                 # upgrade to head
    python -m mpq_service.migrate upgrade [REV]
    python -m mpq_service.migrate downgrade REV   # e.g. base
"""

from __future__ import annotations

import argparse
import fcntl
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from mpq_service.db import make_engine, normalize_url

__all__ = [
    "MIGRATIONS_DIR",
    "MIGRATION_LOCK_ID",
    "alembic_config",
    "downgrade",
    "main",
    "migration_lock",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Key of the Postgres advisory lock: "mpq_migr" in ASCII, unlikely to collide with other users.
MIGRATION_LOCK_ID = 0x6D70715F6D696772

log = logging.getLogger(__name__)


def alembic_config() -> Config:
    """An Alembic Config pointing at the repository's ``migrations`` folder."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _sqlite_lock_path(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database + ".migrate.lock")


@contextmanager
def _postgres_lock(engine: Engine) -> Iterator[None]:
    # Session-level lock on its own autocommit connection: it is independent of the migration's
    # transaction, and released by Postgres even if this process dies mid-migration.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def migration_lock(url: str | URL) -> Iterator[None]:
    """Hold the cross-process migration lock for the database at ``url`` (blocks until free).

    Example:
        >>> with migration_lock("sqlite:///./mpq-data/mpq.db"):
        ...     pass  # no other process migrates this database meanwhile
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        engine = make_engine(parsed)
        try:
            with _postgres_lock(engine):
                yield
        finally:
            engine.dispose()
    elif backend == "sqlite" and (lock_path := _sqlite_lock_path(parsed)) is not None:
        with _file_lock(lock_path):
            yield
    else:
        yield


def _run(url: str | URL, action: str, revision: str) -> None:
    parsed = normalize_url(url)
    config = alembic_config()
    with migration_lock(parsed):
        engine = make_engine(parsed)
        try:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                if action == "upgrade":
                    command.upgrade(config, revision)
                else:
                    command.downgrade(config, revision)
        finally:
            engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``, under the migration lock.

    Args:
        url: SQLAlchemy URL (``postgresql://`` is run with psycopg 3).
        revision: target revision, ``head`` by default.

    Example:
        >>> upgrade("sqlite:///./mpq-data/mpq.db")
    """
    _run(url, "upgrade", revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops every table).

    Example:
        >>> downgrade("sqlite:///./mpq-data/mpq.db", "base")
    """
    _run(url, "downgrade", revision)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpq_service.migrate [upgrade [REV] | downgrade REV]`` against ``MPQ_DATABASE_URL``."""
    from mpq_service.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m mpq_service.migrate", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="action")
    up = sub.add_parser("upgrade", help="migrate up (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    down = sub.add_parser("downgrade", help="migrate down to REV (e.g. base)")
    down.add_argument("revision")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    url = get_settings().database_url
    action = args.action or "upgrade"
    revision = getattr(args, "revision", None) or "head"
    log.info("%s %s on %s", action, revision, normalize_url(url).render_as_string())
    _run(url, action, revision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
