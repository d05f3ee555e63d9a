"""Temporary: ``api/cli.py`` (owned by the engine branch) still imports the migration runner
from here.

It lives in :mod:`mpq_service.migrate` (``python -m mpq_service.migrate``); delete this module
once ``api/cli.py`` imports from there.
"""

from mpq_service.migrate import upgrade

__all__ = ["upgrade"]
