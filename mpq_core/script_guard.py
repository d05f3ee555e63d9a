"""Read a TorchScript archive's source code, before ``torch.jit.load`` compiles it, and refuse
calls to operators outside the allow-list (:mod:`mpq_core.op_allowlist`).

The ``code/**.py`` entries of a TorchScript archive are TorchScript's serialised Python subset;
``torch.jit.load`` compiles all of them and runs the ``__setstate__`` of scripted classes while
loading, so the check has to happen on the text. Python's ``ast`` parses it. Operators appear as
``torch.<op>`` (namespace ``aten``), ``ops.<namespace>.<op>`` and ``torch.ops.<namespace>.<op>``;
TorchBind classes as ``torch.classes.<namespace>.<class>``; tensor methods as ``x.<op>(...)``.
A bare ``torch`` or ``ops`` (e.g. handed to ``getattr``) is refused, as is any ``import``.

Pure Python (no torch import at module level).
"""

from __future__ import annotations

import ast
import io
import pickletools
import re
from collections.abc import Iterator, Mapping

from mpq_core.errors import ModelFormatError
from mpq_core.op_allowlist import denied_names, denied_tensor_methods, op_refusal

__all__ = ["check_script_pickles", "check_script_sources"]

_OP_ROOTS = ("torch", "ops")


def check_script_sources(sources: Mapping[str, bytes]) -> None:
    """Refuse the archive if any source file calls an operator outside the allow-list.

    Args:
        sources: entry name (relative to the archive root, ``code/...py``) -> file content.

    Raises:
        ModelFormatError: ``model_unsafe_op`` naming the operator and the file, or
            ``model_corrupt`` for source that is not valid TorchScript text.
    """
    for name, raw in sorted(sources.items()):
        try:
            tree = ast.parse(raw.decode("utf-8"), filename=name)
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise ModelFormatError(
                f"the TorchScript archive's source file {name} is not valid TorchScript "
                f"({type(exc).__name__}); save the model again with torch.jit.save",
                code="model_corrupt",
            ) from exc
        for line, what, why in _refusals(tree):
            raise ModelFormatError(
                f"the TorchScript code calls {what} ({why}) in {name} line {line}; mpq only "
                "loads models made of pure tensor operators (no file, process, network or "
                "custom operators): remove that call from the model before scripting it",
                code="model_unsafe_op",
            )


def _refusals(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """(line, what, why) for every refused construct of one parsed file."""
    inner: set[int] = set()  # Attribute/Name nodes that are the base of a longer chain
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))
    denied = denied_names()
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield line, "an import statement", "TorchScript code never imports"
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            refusal = _chain_refusal(_chain(node))
            if refusal is not None:
                yield line, refusal[0], refusal[1]
        elif isinstance(node, ast.Name) and node.id in _OP_ROOTS and id(node) not in inner:
            yield line, f"a bare '{node.id}'", "operators must be named directly"
        if isinstance(node, ast.Call):
            method = _called_name(node)
            if method is not None and method in denied:
                yield line, f"'{method}'", op_refusal("aten", method) or "refused"


def _chain(node: ast.Attribute) -> list[str]:
    """``a.b.c`` as ``["a", "b", "c"]``; a chain on a call or subscript starts with ``"?"``."""
    parts: list[str] = []
    cur: ast.expr = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    parts.append(cur.id if isinstance(cur, ast.Name) else "?")
    return parts[::-1]


def _chain_refusal(chain: list[str]) -> tuple[str, str] | None:
    root, rest = chain[0], chain[1:]
    dotted = ".".join(chain)
    if root == "torch":
        if rest[0] in ("ops", "classes"):
            if len(rest) < 3:
                return dotted, "an incomplete operator reference"
            why = op_refusal(rest[1], rest[2])
        else:  # torch.<op>, torch.linalg.<op>, ...: aten operators
            why = next((w for part in rest if (w := op_refusal("aten", part))), None)
    elif root == "ops":
        if len(rest) < 2:
            return dotted, "an incomplete operator reference"
        why = op_refusal(rest[0], rest[1])
    elif root == "__torch__" and rest[:2] == ["torch", "classes"] and len(rest) >= 4:
        why = op_refusal(rest[2], rest[3])  # a TorchBind class of that namespace
    else:
        return None
    return (dotted, why) if why is not None else None


def _called_name(call: ast.Call) -> str | None:
    """The method or function name of a call on anything but ``torch``/``ops``/``__torch__``
    (those are checked as chains), e.g. ``set_`` in ``x.set_(y)`` or ``fork`` in ``fork(f)``."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if not isinstance(func, ast.Attribute):
        return None
    chain = _chain(func)
    if chain[0] in (*_OP_ROOTS, "__torch__"):
        return None  # checked as a chain
    if chain == ["self", func.attr] and func.attr not in denied_tensor_methods():
        return None  # a method of the archive's own class (``self.save``), checked in its file
    return func.attr


#: Globals TorchScript's own (C++) unpickler resolves in ``data.pkl``, ``constants.pkl``,
#: ``traced_inputs.pkl`` and ``*.debug_pkl``: tensors and storages of every dtype, devices and
#: quantization schemes, its list/type helpers, set, complex, OrderedDict, and classes of the
#: archive itself (``__torch__.*``). A TorchBind class
#: (``__torch__.torch.classes.<namespace>.<class>``), whose C++ ``__setstate__`` runs on load,
#: must belong to an allowed namespace.
_PICKLE_GLOBALS = re.compile(
    r"collections OrderedDict|torch\._utils _rebuild_[a-z0-9_]+|torch\.jit\._pickle [a-z0-9_]+"
    r"|torch [A-Za-z0-9]+Storage|torch device|torch per_[a-z_]+|(__builtin__|builtins) (set|complex)"
    r"|__torch__(\.[A-Za-z_][A-Za-z0-9_]*)* [A-Za-z_][A-Za-z0-9_]*"
)


def check_script_pickles(pickles: Mapping[str, bytes]) -> None:
    """Refuse TorchScript pickles that name globals TorchScript never writes (read with
    ``pickletools``, which parses opcodes and executes nothing)."""
    for name, raw in sorted(pickles.items()):
        for what in _pickle_globals(name, raw):
            namespace = _torchbind_namespace(what)
            if namespace is not None:
                why = op_refusal(namespace, "")
            elif _PICKLE_GLOBALS.fullmatch(what):
                why = None
            else:
                why = "a global TorchScript never writes"
            if why is None:
                continue
            raise ModelFormatError(
                f"the TorchScript archive's {name} refers to {what!r} ({why}); mpq only loads "
                "models made of pure tensor operators: save the model again with torch.jit.save",
                code="model_unsafe_op",
            )


def _pickle_globals(name: str, raw: bytes) -> Iterator[str]:
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(raw)):
            if op.name == "GLOBAL":
                yield str(arg)
            elif op.name in ("STACK_GLOBAL", "INST", "OBJ", "REDUCE_EX", "EXT1", "EXT2", "EXT4"):
                yield f"<{op.name} opcode>"  # TorchScript's pickler never writes these
    except (ValueError, EOFError, UnicodeDecodeError) as exc:
        raise ModelFormatError(
            f"the TorchScript archive's {name} is not a valid pickle", code="model_corrupt"
        ) from exc


def _torchbind_namespace(what: str) -> str | None:
    prefix = "__torch__.torch.classes."
    if not what.startswith(prefix):
        return None
    return what.removeprefix(prefix).split(".", 1)[0].split(" ", 1)[0]
