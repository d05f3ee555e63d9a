"""Temporary: ``api/cli.py`` (owned by the engine branch) still imports the settings from here.

The settings live in :mod:`mpq_service.settings`; delete this module once ``api/cli.py``
imports from there.
"""

from mpq_service.settings import get_settings

__all__ = ["get_settings"]
