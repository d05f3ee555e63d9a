"""Strings in a torch.export program that torch evaluates as Python, checked against a grammar.

Two fields of ``models/<name>.json`` are code, not data:

- every ``expr_str`` (a symbolic shape such as ``Mul(Integer(16), Symbol('s23',
  positive=True, integer=True))``) goes through ``sympy.sympify`` while loading, and sympify is
  ``eval`` (``__import__('os').system(...)`` would run);
- every entry of ``guards_code`` (such as ``L['mask'].size()[0] == L['ids'].size()[0]``) is
  pasted into a function that ``ExportedProgram.module()`` ``exec``s, and runs on every call.

Both are refused unless they parse (Python ``ast``, one expression) into a small grammar:
arithmetic, comparisons and boolean operators over numbers, symbol names and calls of the sympy
and torch shape functions torch itself writes. No attribute access (beyond ``.size()``-style
shape reads in guards), no other calls, no string that is not a plain identifier.

Pure Python.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

__all__ = ["guard_refusal", "sympy_expr_refusal"]

#: Callables torch writes into ``expr_str`` (sympy's ``srepr`` of its shape expressions, and
#: the functions of ``torch.utils._sympy.functions`` its deserialiser registers).
SYMPY_CALLABLES = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Min", "Max", "Abs",
        "Mod", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
        "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise",
        "ExprCondPair", "floor", "ceiling", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
        "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
        "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_SYMPY_CONSTANTS = frozenset(
    {"oo", "zoo", "nan", "true", "false", "S", "Infinity", "NegativeInfinity", "int_oo"}
)
#: Shape reads and functions allowed in guards (names of ``SYMPY_INTERP`` and ``math``).
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_MATH = frozenset({"isnan", "isinf", "floor", "ceil", "trunc", "sqrt", "inf"})
_GUARD_NAMES = frozenset({"L", "math", "Max", "Min", "Abs", "Eq", "Ne", "Mod", "FloorDiv"})

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
#: Node types that carry no name, call or constant of their own.
_STRUCTURE = (
    ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context, ast.Expression,
    ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
)  # fmt: skip
_MAX_LEN = 100_000


def _parse(text: str) -> ast.Expression | str:
    if len(text) > _MAX_LEN or "\\" in text or '"' in text or "\n" in text:
        return "too long, or a backslash, double quote or newline"
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return "not one Python expression"


def _constant_refusal(node: ast.Constant) -> str | None:
    value = node.value
    if isinstance(value, str) and not _IDENT.fullmatch(value):
        return f"the string {value!r}"
    if not isinstance(value, bool | int | float | str) and value is not None:
        return f"the constant {value!r}"
    return None


def _first_refusal(text: str, refuse: Callable[[ast.AST], str | None]) -> str | None:
    """Parse ``text`` as one expression and return the first node ``refuse`` objects to (the
    structural nodes and plain constants are shared by both grammars)."""
    tree = _parse(text)
    if isinstance(tree, str):
        return tree
    for node in ast.walk(tree):
        if isinstance(node, _STRUCTURE):
            continue
        why = _constant_refusal(node) if isinstance(node, ast.Constant) else refuse(node)
        if why is not None:
            return why
    return None


def _sympy_node_refusal(node: ast.AST) -> str | None:
    if isinstance(node, ast.keyword):
        return "a ** argument" if node.arg is None else None
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLABLES):
            return f"a call of {ast.unparse(node.func)}"
        return None
    if isinstance(node, ast.Name):
        ok = node.id in SYMPY_CALLABLES or node.id in _SYMPY_CONSTANTS
        return None if ok or _SYMBOL.fullmatch(node.id) else f"the name {node.id!r}"
    return f"a {type(node).__name__} expression"


def sympy_expr_refusal(text: str) -> str | None:
    """Why ``expr_str`` must not reach ``sympy.sympify``, or None when it is a plain shape."""
    return _first_refusal(text, _sympy_node_refusal)


def _guard_node_refusal(node: ast.AST) -> str | None:
    if isinstance(node, ast.Subscript):
        return None if isinstance(node.slice, ast.Constant) else "a computed subscript"
    if isinstance(node, ast.Attribute):
        on_math = isinstance(node.value, ast.Name) and node.value.id == "math"
        allowed = _GUARD_MATH if on_math else _GUARD_METHODS
        return None if node.attr in allowed else f"the attribute {node.attr!r}"
    if isinstance(node, ast.Call):
        if node.keywords or not isinstance(node.func, ast.Attribute | ast.Name):
            return f"a call of {ast.unparse(node.func)}"
        if isinstance(node.func, ast.Name) and node.func.id in ("L", "math"):
            return f"a call of {node.func.id}"
        return None
    if isinstance(node, ast.Name):
        return None if node.id in _GUARD_NAMES else f"the name {node.id!r}"
    return f"a {type(node).__name__} expression"


def guard_refusal(text: str) -> str | None:
    """Why a ``guards_code`` entry must not be ``exec``-ed, or None when it is a shape guard."""
    return _first_refusal(text, _guard_node_refusal)
