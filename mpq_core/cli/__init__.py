"""The ``mpq`` command line: ``inspect``, ``analyze``, ``allocate``, ``quantize``, ``sweep``,
plus the commands that installed plugins register.

One module per command (:mod:`mpq_core.cli.inspect`, ``analyze``, ``allocate``, ``quantize``,
``sweep``),
each with ``add_parser(subparsers)`` and ``run(args)``; the job spec's flags are generated from
its fields by :mod:`mpq_core.cli.spec_args`.

Plugin hook
-----------
Other packages add commands through the entry-point group ``mpq.commands``. Each entry point
names a callable ``register(subparsers) -> None`` that adds its subcommands to the ``argparse``
subparsers object and sets ``func`` (``args -> exit status``) on each, e.g. in pyproject.toml::

    [project.entry-points."mpq.commands"]
    service = "api.cli:register"

A command reports a problem its user can fix by raising :class:`mpq_core.errors.MpqError` (with
its own ``code``): ``mpq`` prints ``mpq: error [code]: message`` and exits with status 2. Any
other failure is a bug of mpq's (or an architecture it does not handle yet): it is printed as
``mpq: error [internal_error]: ...`` with exit status 3, and ``mpq --debug`` shows the traceback. A
plugin whose import fails (say, its optional dependencies are not installed) is skipped, and the
engine's commands work as before. Importing this package loads no torch: commands import the
heavy modules when they run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points

from mpq_core.cli import allocate, analyze, inspect, quantize, sweep
from mpq_core.errors import MpqError

__all__ = ["ENTRY_POINT_GROUP", "build_parser", "main", "register_plugins", "run"]

ENTRY_POINT_GROUP = "mpq.commands"


def register_plugins(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Let every ``mpq.commands`` entry point add its commands (see the module docstring)."""
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError:  # its optional dependencies are missing: the engine works without
            continue
        register(subparsers)


def _version() -> str:
    """``mpq X`` and the versions of what decides its results (torch, onnxruntime)."""
    from importlib.metadata import PackageNotFoundError, version

    from mpq_core import __version__

    parts = [f"mpq {__version__}"]
    for dist in ("torch", "onnxruntime"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    """The parser of ``mpq``: the engine's commands, and the plugins' unless ``plugins=False``."""
    parser = argparse.ArgumentParser(
        prog="mpq",
        description="Mixed-precision quantization: profile a model, score layer sensitivities, "
        "allocate bit widths under a budget, quantize.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the Python traceback of an unexpected error"
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (inspect, analyze, allocate, quantize, sweep):
        command.add_parser(sub)
    if plugins:
        register_plugins(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser``, run the chosen command, and turn the errors a user can
    cause into ``mpq: error [code]: message`` and exit status 2, anything else into
    ``mpq: error [internal_error]: ...`` and exit status 3 (a traceback only with ``--debug``)."""
    warnings.filterwarnings("ignore", message=".*torch.jit.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MpqError as exc:
        print(f"mpq: error [{exc.code}]: {exc.message}", file=sys.stderr)
    except FileNotFoundError as exc:
        print(f"mpq: error [file_not_found]: {exc.filename}: no such file", file=sys.stderr)
    except KeyboardInterrupt:
        print("mpq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        from mpq_core.runner import error_summary

        first = error_summary(exc, 500)
        print(
            f"mpq: error [internal_error]: {type(exc).__name__}: {first} (this is a bug in mpq or "
            "an architecture it does not handle yet; run with --debug for the traceback and "
            "report it)",
            file=sys.stderr,
        )
        return 3
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpq`` console script."""
    return run(build_parser(), argv)
