"""Layer-name patterns (pins and ties), matched in bounded time.

Pins and ties are regular expressions from the user, matched against every layer name. Python's
``re`` backtracks: ``(a+)+$`` against a long name runs for hours and would hang a worker (or the
API, which validates specs). So patterns are compiled with RE2 (``google-re2``), whose automata
match in time linear in the name, and are bounded before they are compiled: at most
:data:`MAX_PATTERN_CHARS` characters, and RE2's compiled program at most
:data:`_RE2_MAX_MEM` bytes (``a{1000}{1000}`` is refused instead of filling memory).

RE2 syntax is Python's without back-references and look-around (``(?=``, ``(?!``, ``\\1``);
such a pattern is refused with ``invalid_regex``.

Pure Python (no torch): the API checks patterns too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import re2

from mpq_core.errors import SpecError

__all__ = ["MAX_PATTERN_CHARS", "LayerPattern", "compile_pattern"]

#: Longest pin or tie pattern accepted (a layer name plus some alternatives fits easily).
MAX_PATTERN_CHARS = 200
# RE2's memory for one compiled pattern; its default (8 MiB) is far more than any layer-name
# pattern of 200 characters needs unless it nests counted repetitions.
_RE2_MAX_MEM = 1 << 20


class LayerPattern:
    """A compiled pin or tie pattern; :meth:`fullmatch` says whether a whole name matches."""

    def __init__(self, text: str, compiled: Any) -> None:
        self.text = text
        self._compiled = compiled

    def fullmatch(self, name: str) -> bool:
        return self._compiled.fullmatch(name) is not None

    def matching(self, names: Sequence[str]) -> list[int]:
        """Indexes of the names this pattern matches whole."""
        return [i for i, name in enumerate(names) if self.fullmatch(name)]


def _options() -> Any:
    opts = re2.Options()
    opts.max_mem = _RE2_MAX_MEM
    opts.log_errors = False  # refusals are reported to the user, not logged on stderr
    return opts


@lru_cache(maxsize=1024)
def _compiled(text: str) -> Any:
    return re2.compile(text, _options())


def compile_pattern(text: Any, what: str) -> LayerPattern:
    """``text`` as a bounded layer-name pattern (``what``: ``pin`` or ``tie``, for messages).

    Raises:
        SpecError: ``spec_type`` when it is not a string, ``regex_too_long`` over
            :data:`MAX_PATTERN_CHARS`, ``invalid_regex`` when RE2 refuses it (bad syntax,
            back-references, look-around, too large once compiled).

    Example:
        >>> compile_pattern(r"features\\.\\d+\\.weight", "pin").fullmatch("features.3.weight")
        True
    """
    if not isinstance(text, str):
        raise SpecError(
            f"{what} pattern must be a string, got {type(text).__name__}", code="spec_type"
        )
    if len(text) > MAX_PATTERN_CHARS:
        raise SpecError(
            f"{what} pattern {text[:40]!r}... has {len(text)} characters; at most "
            f"{MAX_PATTERN_CHARS} are accepted",
            code="regex_too_long",
        )
    try:
        return LayerPattern(text, _compiled(text))
    except re2.error as exc:
        raw = exc.args[0] if exc.args else "refused"
        why = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        raise SpecError(
            f"{what} pattern {text!r} is not a valid regex ({why}); patterns use RE2 syntax: "
            "Python's without back-references or look-around",
            code="invalid_regex",
        ) from None
