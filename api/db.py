"""Temporary: ``api/cli.py`` (owned by the engine branch) still imports the database helpers
from here.

They live in :mod:`mpq_service.db`; delete this module once ``api/cli.py`` imports from there.
"""

from mpq_service.db import make_engine, make_sessionmaker, normalize_url, session_scope

__all__ = ["make_engine", "make_sessionmaker", "normalize_url", "session_scope"]
