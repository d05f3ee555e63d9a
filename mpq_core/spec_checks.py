"""Strict checks of job spec values as they arrive in JSON: types, finiteness, ranges, text.

A spec comes from users and from anyone holding an API key. Python would read many wrong values
without a complaint (``int(2.5)`` is 2, ``int("8")`` is 8, a string iterates as characters,
``int(float("inf"))`` raises OverflowError), and some JSON values cannot even be stored
(Postgres refuses ``NaN`` and NUL characters). Each check here raises a :class:`SpecError` with
a code that says what kind of mistake it is:

- ``spec_not_finite``: ``NaN``, ``Infinity`` or ``-Infinity`` anywhere;
- ``spec_type``: the wrong JSON type (a string for a number, a fractional bit width, a string
  where a list is needed, ...);
- ``spec_out_of_range``: a number outside what the field accepts;
- ``spec_too_large``: too many entries, text too long, nesting too deep;
- ``spec_bad_text``: NUL, other control characters or lone surrogates in a string.

Pure Python (no torch): the API runs these before a job is stored.
"""

from __future__ import annotations

import math
from typing import Any

from mpq_core.errors import SpecError

__all__ = [
    "MAX_ITEMS",
    "MAX_TEXT_CHARS",
    "as_bool",
    "as_float",
    "as_int",
    "as_str_list",
    "check_plain_json",
    "check_text",
]

#: Most entries in any one list or object of a spec (a cost table row per layer needs many).
MAX_ITEMS = 100_000
#: Longest string anywhere in a spec (layer names are far shorter).
MAX_TEXT_CHARS = 1000
_MAX_DEPTH = 8  # a spec is at most spec -> cost_table -> layer -> bits: cost


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_text(name: str, text: str, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``text`` if it is short and holds no control character or lone surrogate (neither can
    be stored in Postgres, nor be part of a layer name or budget)."""
    if len(text) > max_chars:
        raise SpecError(
            f"{name} is {len(text)} characters long; at most {max_chars} are accepted",
            code="spec_too_large",
        )
    for ch in text:
        if ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff":
            raise SpecError(
                f"{name} holds the control character {ch!r}; remove it", code="spec_bad_text"
            )
    return text


def check_plain_json(value: Any, path: str = "spec", depth: int = 0) -> None:
    """Walk a JSON value: every number finite, every string clean, bounded size and depth.

    Raises:
        SpecError: naming the first bad place (``path``), with one of this module's codes.
    """
    if depth > _MAX_DEPTH:
        raise SpecError(f"{path} is nested too deeply", code="spec_too_large")
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(
            f"{path} is {value}; every number in a job spec must be finite",
            code="spec_not_finite",
        )
    if isinstance(value, str):
        check_text(path, value)
    elif isinstance(value, (list, dict)):
        if len(value) > MAX_ITEMS:
            raise SpecError(
                f"{path} has {len(value)} entries; at most {MAX_ITEMS} are accepted",
                code="spec_too_large",
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                check_text(f"{path} key", key)
            check_plain_json(
                item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]", depth + 1
            )


def _out_of_range(name: str, value: float, lo: float, hi: float, *, above_lo: bool) -> SpecError:
    if value > hi:
        why = f"at most {hi}"
    elif lo == 0:
        why = "positive" if above_lo else "not negative"
    else:
        why = f"above {lo}" if above_lo else f"at least {lo}"
    return SpecError(f"{name} must be {why}, got {value}", code="spec_out_of_range")


def as_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; a float is accepted only when it is integral
    (``4.0``, as some JSON encoders write 4)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name} must be an integer, got {_kind(value)}", code="spec_type")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(
                f"{name} is {value}; it must be a finite integer", code="spec_not_finite"
            )
        if not value.is_integer():
            raise SpecError(f"{name} must be a whole number, got {value}", code="spec_type")
    if not lo <= value <= hi:
        raise _out_of_range(name, value, lo, hi, above_lo=False)
    return int(value)


def as_float(name: str, value: Any, lo: float, hi: float, *, above_lo: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``above_lo``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name} must be a number, got {_kind(value)}", code="spec_type")
    out = float(value)
    if not math.isfinite(out):
        raise SpecError(f"{name} is {out}; it must be a finite number", code="spec_not_finite")
    if out < lo or out > hi or (above_lo and out == lo):
        raise _out_of_range(name, out, lo, hi, above_lo=above_lo)
    return out


def as_bool(name: str, value: Any) -> bool:
    """``value`` if it is a JSON boolean (the string ``"false"`` is not, and would be true)."""
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false, got {_kind(value)}", code="spec_type")
    return value


def as_str_list(name: str, value: Any, max_items: int, example: str) -> list[str]:
    """``value`` if it is a list of at most ``max_items`` clean strings (a bare string is
    refused: it would be read one character at a time)."""
    if not isinstance(value, (list, tuple)):
        raise SpecError(
            f"{name} must be a list of strings, e.g. {example}, got {_kind(value)}",
            code="spec_type",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise SpecError(
                f"{name}[{i}] must be a string, e.g. {example}, got {_kind(item)}",
                code="spec_type",
            )
    if len(value) > max_items:
        raise SpecError(
            f"{name} has {len(value)} entries; at most {max_items} are accepted",
            code="spec_too_large",
        )
    return [check_text(f"{name}[{i}]", v) for i, v in enumerate(value)]
