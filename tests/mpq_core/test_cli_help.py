"""``mpq --help`` of every command, the service's included: every argument has help text, and
every option with a default names it ``(default: ...)``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields

import pytest

from mpq_core.cli import build_parser
from mpq_core.cli.spec_args import _spec_fields, default_text
from mpq_core.spec import JobSpec

#: Flags that are off unless given: their default goes without saying.
_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction)
_SKIPPED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("mpq",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command of ``parser`` with its path, ``("mpq", "keys", "create")``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _arguments() -> list[tuple[str, argparse.Action]]:
    return [
        (" ".join(path), action)
        for path, parser in _commands(build_parser())
        for action in parser._actions
        if not isinstance(action, _SKIPPED)
    ]


#: The spec's default of every generated flag (by dest), as the help writes it.
_SPEC_DEFAULTS = {
    path: default_text(path, f) for path, f in _spec_fields([f.name for f in fields(JobSpec)])
}


def _default_shown(action: argparse.Action) -> str | None:
    """The default an option's help must name: its own, or for a job spec flag (whose parser
    default is SUPPRESS, so the spec's applies) the spec's."""
    if action.default == argparse.SUPPRESS:
        return _SPEC_DEFAULTS.get(action.dest)
    if action.default is None or isinstance(action, _SWITCHES):
        return None
    return str(action.default)


def test_the_walk_reaches_every_command_and_the_services() -> None:
    paths = {path for path, _ in _commands(build_parser())}
    engine = {("mpq", c) for c in ("inspect", "analyze", "allocate", "quantize", "sweep")}
    assert engine | {("mpq", "serve"), ("mpq", "keys", "create")} <= paths


@pytest.mark.parametrize(("command", "action"), _arguments(), ids=lambda v: str(v)[:60])
def test_every_argument_has_help_and_names_its_default(
    command: str, action: argparse.Action
) -> None:
    where = f"{command} {'/'.join(action.option_strings) or action.dest}"
    assert action.help and action.help.strip(), f"{where}: no help text"
    shown = _default_shown(action)
    if shown is None or action.required:
        return
    assert "(default: " in action.help, f"{where}: help does not name its default {shown!r}"
    # allocate's --bits: the table's widths (its own test); %(default)s: argparse fills it in.
    if "%(default)" not in action.help and (command, action.dest) != ("mpq allocate", "bits"):
        assert f"(default: {shown})" in action.help, (where, action.help)


def test_on_by_default_flags_name_the_form_that_applies() -> None:
    quantize = dict(_commands(build_parser()))[("mpq", "quantize")]
    help_text = quantize.format_help()
    for flag in ("--symmetric", "--runtime-exports"):
        assert f"(default: {flag})" in " ".join(help_text.split()), flag


def test_allocate_bits_default_is_the_tables_not_the_specs() -> None:
    allocate = dict(_commands(build_parser()))[("mpq", "allocate")]
    bits = next(a for a in allocate._actions if a.dest == "bits")
    assert bits.help is not None and "(default: the table's bit widths)" in bits.help


def test_printed_help_fills_in_the_defaults() -> None:
    """The help as printed, by ``python -m mpq_core.cli`` (``%(default)s`` filled in)."""
    for argv, expected in (
        (["quantize", "--help"], "(default: 0.0001)"),
        (["serve", "--help"], "(default: 8000)"),
        (["keys", "create", "--help"], "(default: default)"),
        (["analyze", "--help"], "(default: 5.0)"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "mpq_core.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert expected in " ".join(out.stdout.split()), (argv, out.stdout)
