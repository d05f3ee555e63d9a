"""Command-line flags generated from the job spec's fields, and the spec built back from them.

Every flag, its help, choices and default come from :class:`mpq_core.spec.JobSpec` (help text
lives in each field's metadata), so a flag is named like its JSON field: top-level ``batch_size``
is ``--batch-size``; a field of a sub-object takes its dotted JSON path, ``finetune.lr`` is
``--finetune.lr`` and ``analysis.hawq_iterations`` is ``--analysis.hawq-iterations`` (as
LightningCLI / jsonargparse do). Lists: ``--budgets`` (repeatable, alias ``--budget``),
``--pins REGEX=BITS`` (alias ``--pin``), ``--ties REGEX`` (alias ``--tie``) and ``--bits 2,3,4,8``.

Flags that are not given stay out of the parsed namespace, so the spec's own defaults apply:
no default is written down twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, Field, fields
from enum import Enum
from typing import Any

from mpq_core.errors import SpecError
from mpq_core.spec import SCHEMA_VERSION, AnalysisSpec, FinetuneSpec, JobSpec

__all__ = [
    "add_spec_arguments",
    "default_text",
    "flag_name",
    "parse_bits",
    "parse_pins",
    "spec_from_args",
    "spec_values",
]

_PARTS: dict[str, type[AnalysisSpec] | type[FinetuneSpec]] = {
    "analysis": AnalysisSpec,
    "finetune": FinetuneSpec,
}
_PART_TITLES = {
    "analysis": "sensitivity analysis (JSON: analysis.*)",
    "finetune": "fine-tuning (JSON: finetune.*)",
}


def flag_name(path: str) -> str:
    """``batch_size`` -> ``--batch-size``; ``finetune.batch_size`` -> ``--finetune.batch-size``."""
    return "--" + path.replace("_", "-")


def _spec_fields(names: Iterable[str]) -> Iterator[tuple[str, Field[Any]]]:
    """(dotted path, field) of the named spec fields; a sub-object's name stands for all of
    its fields."""
    top = {f.name: f for f in fields(JobSpec)}
    for name in names:
        head, _, tail = name.partition(".")
        if head in _PARTS:
            for f in fields(_PARTS[head]):
                if not tail or f.name == tail:
                    yield f"{head}.{f.name}", f
        else:
            yield name, top[name]


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def default_text(path: str, f: Field[Any]) -> str | None:
    """How ``--help`` writes a field's default: ``2,3,4,5,6,8``, ``fisher``, ``--symmetric``;
    None where the field has none to show (unset, an empty list, a flag that is off)."""
    default = _default(f)
    if default is None or default in ([], {}) or default is False:
        return None
    if default is True:  # a --name / --no-name pair: name the one that applies
        return flag_name(path)
    if isinstance(default, Enum):
        return str(default.value)
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def _help(path: str, f: Field[Any], default: str | None) -> str:
    text = str(f.metadata.get("help", ""))
    shown = default if default is not None else default_text(path, f)
    if shown is None or "(default:" in text:
        return text
    return f"{text} (default: {shown})"


def add_spec_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str],
    *,
    required: Iterable[str] = (),
    defaults: dict[str, str] | None = None,
) -> None:
    """Add a flag for every named spec field (``"analysis"`` adds all of its fields); its help
    ends with the spec's default, or with ``defaults[path]`` where the command supplies its own
    (``mpq allocate`` takes the table's bit widths)."""
    must = set(required)
    shown = defaults or {}
    groups: dict[str, Any] = {}
    for path, f in _spec_fields(names):
        head, dot, _ = path.partition(".")
        target: Any = parser
        if dot:
            if head not in groups:
                groups[head] = parser.add_argument_group(_PART_TITLES[head])
            target = groups[head]
        meta = f.metadata
        kind = meta.get("kind")
        default = _default(f)
        flags = [flag_name(path)] + ([meta["alias"]] if "alias" in meta else [])
        kwargs: dict[str, Any] = {
            "dest": path,
            "default": argparse.SUPPRESS,
            "help": _help(path, f, shown.get(path)),
        }
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        elif dot and not isinstance(default, bool | Enum):
            kwargs["metavar"] = f.name.upper()
        if kind in ("append", "pins"):
            kwargs["action"] = "append"
        elif default is True:  # on by default: --name / --no-name
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(default, Enum):
            kwargs["choices"] = [m.value for m in type(default)]
        elif kind == "int":
            kwargs["type"] = int
        elif kind is None:
            kwargs["type"] = type(default)
        if path in must:
            kwargs["required"] = True
        target.add_argument(*flags, **kwargs)


def parse_bits(text: str) -> list[int]:
    """``"2,3,4,8"`` -> ``[2, 3, 4, 8]`` (sorted, distinct); the one bit-list parser of the CLI."""
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError as exc:
        raise SpecError(f"--bits takes a comma-separated list like 2,3,4,8, got {text!r}") from exc
    if not bits:
        raise SpecError("--bits needs at least one bit width")
    return bits


def parse_pins(items: list[str]) -> dict[str, int]:
    """``["REGEX=BITS", ...]`` -> ``{REGEX: BITS}`` (the regex may itself hold ``=``)."""
    pins: dict[str, int] = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern:
            raise SpecError(f"--pins needs REGEX=BITS, got {item!r}")
        try:
            pins[pattern] = int(bits)
        except ValueError as exc:
            raise SpecError(f"--pins {item!r}: {bits!r} is not a bit width") from exc
    return pins


def _output_key(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def _cost_table(path: str) -> dict[str, Any]:
    from mpq_core.budgets import load_cost_table

    return {
        name: {str(b): c for b, c in row.items()} for name, row in load_cost_table(path).items()
    }


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "bits": parse_bits,
    "pins": parse_pins,
    "key": _output_key,
    "cost_table": _cost_table,
}


def spec_values(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields given on the command line, converted, in the spec's JSON shape
    (sub-objects nested)."""
    given = vars(args)
    values: dict[str, Any] = {}
    for path, f in _spec_fields([f.name for f in fields(JobSpec)]):
        if path not in given:
            continue
        convert = _CONVERT.get(f.metadata.get("kind", ""))
        value = convert(given[path]) if convert is not None else given[path]
        head, dot, tail = path.partition(".")
        if dot:
            values.setdefault(head, {})[tail] = value
        else:
            values[path] = value
    return values


def spec_from_args(args: argparse.Namespace, **defaults: Any) -> JobSpec:
    """The job spec of a command line: the flags given, else ``defaults``, else the spec's own
    defaults."""
    return JobSpec.from_dict({"schema_version": SCHEMA_VERSION, **defaults, **spec_values(args)})
