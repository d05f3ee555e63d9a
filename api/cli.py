"""The ``mpq`` command: the engine's commands plus the service's ``serve`` and ``keys create``.

Every subcommand of :func:`mpq_core.cli.build_parser` (``inspect``, ``analyze``, ``allocate``,
``quantize``) is kept as it is; this module adds:

- ``mpq serve [--host H] [--port P] [--no-worker]``: the embedded service (API, a Celery worker,
  SQLite, local storage, a broker that needs no server), see :mod:`api.serve`.
- ``mpq keys create NAME [--tenant T]``: migrate the configured database if needed, create an
  API key and print only its plaintext on stdout (everything else goes to stderr).

Importing this module imports neither torch nor the service's heavy modules: the service
commands import them inside their functions, and :mod:`mpq_core.cli` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mpq_core.cli import build_parser as build_core_parser
from mpq_core.cli import run

__all__ = ["DEFAULT_TENANT", "build_parser", "main"]

DEFAULT_TENANT = "default"

log = logging.getLogger("mpq")


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("mpq_core.cli.build_parser() has no subcommands")


def _setup_logging() -> None:
    # Only mpq's own messages at INFO (alembic's and others' stay at their defaults).
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mpq: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _cmd_serve(args: argparse.Namespace) -> int:
    from api.serve import serve
    from api.settings import get_settings

    _setup_logging()
    return serve(get_settings(), host=args.host, port=args.port, worker=not args.no_worker)


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from api.auth import create_key
    from api.db import make_engine, make_sessionmaker, normalize_url, session_scope
    from api.migrate import upgrade
    from api.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            key = create_key(
                session,
                args.tenant,
                args.name,
                pepper=settings.api_key_pepper.get_secret_value(),
            )
    finally:
        engine.dispose()
    where = normalize_url(settings.database_url).render_as_string(hide_password=True)
    print(
        f"mpq: created API key {args.name!r} for tenant {args.tenant!r} in {where}; "
        "it is shown only once, below",
        file=sys.stderr,
    )
    print(key, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``mpq`` command: the engine's subcommands plus the service's."""
    parser = build_core_parser()
    parser.description = (
        "Mixed-precision quantization: profile a model, score layer sensitivities, allocate bit "
        "widths under a budget, quantize; or run the service (serve, keys)."
    )
    sub = _subcommands(parser)

    p = sub.add_parser(
        "serve",
        help="run the embedded service: API + one worker, SQLite and files under MPQ_DATA_DIR",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="start only the API (run workers yourself: celery -A worker.celery_app worker)",
    )
    p.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser(
        "create", help="create an API key (migrates the database if needed); prints only the key"
    )
    p.add_argument("name", help="a name for the key, to tell your keys apart")
    p.add_argument(
        "--tenant",
        default=DEFAULT_TENANT,
        help=f"tenant owning the key, created if new ({DEFAULT_TENANT})",
    )
    p.set_defaults(func=_cmd_keys_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpq`` console script: the engine's commands plus the service's."""
    return run(
        build_parser(), argv, more_errors={error: "bad_settings" for error in _settings_errors()}
    )


def _settings_errors() -> tuple[type[Exception], ...]:
    try:
        from pydantic import ValidationError
    except ImportError:  # the service extra is not installed
        return ()
    return (ValidationError,)


if __name__ == "__main__":
    sys.exit(main())
