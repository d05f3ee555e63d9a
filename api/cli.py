"""The service's ``mpq`` commands, registered through the engine's ``mpq.commands`` hook.

``register`` (the entry point ``service = "api.cli:register"`` in pyproject.toml, see
:mod:`mpq_core.cli`) adds:

- ``mpq serve [--host H] [--port P] [--no-worker]``: the embedded service (API, a Celery worker,
  SQLite, local storage, a broker that needs no server), see :mod:`api.serve`.
- ``mpq keys create NAME [--tenant T]``: migrate the configured database if needed, create an
  API key and print only its plaintext on stdout (everything else goes to stderr).
- ``mpq keys list [--tenant T] [--json]``: every key's id, prefix, name, tenant, creation and
  revocation time (never a secret: only hashes are stored).
- ``mpq keys revoke REF [--tenant T]``: revoke the key with that id (or unique prefix).

Importing this module imports neither torch nor the service's heavy modules: the commands import
them inside their functions. Settings that do not validate are reported as
``mpq: error [bad_settings]: ...`` (exit status 2), like every other user error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mpq_core.errors import MpqError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mpq_service.settings import Settings
    from mpq_service.tables import ApiKey

__all__ = ["DEFAULT_TENANT", "BadSettings", "register"]

DEFAULT_TENANT = "default"


class BadSettings(MpqError):
    """The service's settings (environment variables, ``.env``) do not validate."""

    code = "bad_settings"


Command = Callable[[argparse.Namespace], int]


def _settings_errors_reported(command: Command) -> Command:
    """Turn a settings ValidationError into :class:`BadSettings`, which ``mpq`` reports."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        try:
            return command(args)
        except ValidationError as exc:
            raise BadSettings(str(exc)) from exc

    return run


def _cmd_serve(args: argparse.Namespace) -> int:
    from api.serve import serve
    from mpq_service.settings import get_settings

    # serve() sets up logging (MPQ_LOG_FORMAT) for itself and its worker.
    return serve(get_settings(), host=args.host, port=args.port, worker=not args.no_worker)


@contextlib.contextmanager
def _key_store() -> Iterator[tuple[Session, Settings]]:
    """A session on the configured database, migrated first if needed; commits on success."""
    from mpq_service.db import make_engine, make_sessionmaker, session_scope
    from mpq_service.migrate import upgrade
    from mpq_service.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            yield session, settings
    finally:
        engine.dispose()


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from api.auth import create_key
    from mpq_service.db import normalize_url

    with _key_store() as (session, settings):
        pepper = settings.api_key_pepper.get_secret_value()
        key = create_key(session, args.tenant, args.name, pepper=pepper)
    where = normalize_url(settings.database_url).render_as_string(hide_password=True)
    print(
        f"mpq: created API key {args.name!r} for tenant {args.tenant!r} in {where}; "
        "it is shown only once, below",
        file=sys.stderr,
    )
    print(key, flush=True)
    return 0


def _key_fields(key: ApiKey, tenant: str) -> dict[str, str | None]:
    revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else None
    return {
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "tenant": tenant,
        "created_at": key.created_at.isoformat(timespec="seconds"),
        "revoked_at": revoked,
    }


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from api.auth import list_keys

    with _key_store() as (session, _):
        rows = [_key_fields(key, tenant) for key, tenant in list_keys(session, args.tenant)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "prefix", "name", "tenant", "created_at", "revoked_at")
    table = [[str(r[c] or "-") for c in columns] for r in rows]
    widths = [max([len(c), *(len(line[i]) for line in table)]) for i, c in enumerate(columns)]
    for line in [list(columns), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from api.auth import revoke_key_ref

    with _key_store() as (session, _):
        key = revoke_key_ref(session, args.ref, args.tenant)
        name, ident = key.name, key.id
    print(f"mpq: revoked API key {name!r} ({ident}); requests with it now get 401", file=sys.stderr)
    return 0


def _add_keys_commands(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser(
        "create", help="create an API key (migrates the database if needed); prints only the key"
    )
    p.add_argument("name", help="a name for the key, to tell your keys apart")
    p.add_argument(
        "--tenant",
        default=DEFAULT_TENANT,
        help=f"tenant owning the key, created if new (default: {DEFAULT_TENANT})",
    )
    p.set_defaults(func=_settings_errors_reported(_cmd_keys_create))

    p = keys_sub.add_parser(
        "list", help="list API keys (id, prefix, name, tenant, created, revoked); never secrets"
    )
    p.add_argument("--tenant", default=None, help="only this tenant's keys (default: every key)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_settings_errors_reported(_cmd_keys_list))

    p = keys_sub.add_parser("revoke", help="revoke an API key: requests with it get 401")
    p.add_argument("ref", help="the key's id, or its prefix when only one key has it")
    p.add_argument(
        "--tenant", default=None, help="only match this tenant's keys (default: any tenant)"
    )
    p.set_defaults(func=_settings_errors_reported(_cmd_keys_revoke))


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``keys`` to the ``mpq`` command (the ``mpq.commands`` entry point)."""
    p = subparsers.add_parser(
        "serve",
        help="run the embedded service: API + one worker, SQLite and files under MPQ_DATA_DIR",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="start only the API (run workers yourself: celery -A worker.celery_app worker)",
    )
    p.set_defaults(func=_settings_errors_reported(_cmd_serve))

    _add_keys_commands(subparsers)
