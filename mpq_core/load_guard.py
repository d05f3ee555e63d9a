"""The torch side of intake's guard: what needs torch to check, and the defence in depth around
``torch.export.load`` and ``torch.jit.load``.

- :func:`check_sample_inputs`: a torch.export archive's sample inputs must load with torch's
  restricted unpickler (``weights_only=True``). torch itself would retry a failure with
  ``weights_only=False``, i.e. run the pickle.
- :class:`forbid_unpickling`: while mpq calls the loaders, ``torch.load`` always runs with
  ``weights_only=True`` and the object unpicklers the torch.export loader uses
  (``torch._C._pickle_load_obj`` and its module's ``pickle.loads``) raise. This holds even if the
  structural checks of :mod:`mpq_core.archive_guard` were bypassed.
- :class:`forbid_python_eval`: the same for the strings torch evaluates as Python (shape
  expressions through ``sympy.sympify``, guards ``exec``-ed by ``ExportedProgram.module()``).
- :func:`check_script_graphs`: after ``torch.jit.load``, every method's graph (inlined) is walked
  and its exact node kinds checked against the allow-list.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, NoReturn

import torch

from mpq_core.errors import ModelFormatError
from mpq_core.expr_guard import guard_refusal, sympy_expr_refusal
from mpq_core.op_allowlist import op_refusal

__all__ = ["check_sample_inputs", "check_script_graphs", "forbid_python_eval", "forbid_unpickling"]

_PICKLE_MESSAGE = (
    "the torch.export archive's {what} can only be loaded by unpickling arbitrary objects, "
    "which runs code; mpq refuses it. Re-export the model with plain tensors as inputs, "
    "weights and constants using torch.export.save"
)


class _RefusedUnpickle(ModelFormatError):
    """Raised inside torch's loader when it tries to unpickle with code execution."""

    code = "model_pickle"


class _NoPickle:
    """Stands in for the ``pickle`` module inside torch's pt2 loader."""

    def __init__(self, owner: _Patching) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        self._owner.refuse(_RefusedUnpickle(_PICKLE_MESSAGE.format(what="object constant")))


class _Patching:
    """Patches torch (or sympy) while active, restores them on exit, and makes the first
    refusal the error the caller sees: torch wraps errors raised inside its loader."""

    def __init__(self) -> None:
        self.refusal: ModelFormatError | None = None
        self._saved: list[tuple[Any, str, Any]] = []

    def refuse(self, error: ModelFormatError) -> NoReturn:
        if self.refusal is None:
            self.refusal = error
        raise error

    def _patch(self, owner: Any, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
        if exc is not None and self.refusal is not None and exc is not self.refusal:
            raise self.refusal from exc


class forbid_unpickling(_Patching):  # lower case: used like contextlib's context managers
    """Context manager: no unpickling that can run code while it is active (one thread).

    Example:
        >>> with forbid_unpickling():  # doctest: +SKIP
        ...     program = torch.export.load(buf)
    """

    def __enter__(self) -> forbid_unpickling:
        from torch.export.pt2_archive import _package

        real_load = torch.load

        def restricted_load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
            refused = _RefusedUnpickle(_PICKLE_MESSAGE.format(what="pickled part"))
            if args or kwargs.get("pickle_module") is not None:
                self.refuse(refused)
            kwargs["weights_only"] = True  # whatever the caller (torch's loader) asked for
            try:
                return real_load(f, map_location, **kwargs)
            except Exception as exc:
                self.refusal = self.refusal or refused
                raise refused from exc

        def refuse_object(*_: Any, **__: Any) -> Any:
            self.refuse(_RefusedUnpickle(_PICKLE_MESSAGE.format(what="custom-object constant")))

        self._patch(torch, "load", restricted_load)
        self._patch(torch._C, "_pickle_load_obj", refuse_object)
        self._patch(_package, "pickle", _NoPickle(self))
        return self


class forbid_python_eval(_Patching):  # lower case: used like contextlib's context managers
    """Context manager for loading a program and calling ``ExportedProgram.module()``: the
    strings torch evaluates as Python (``sympy.sympify`` of shape expressions, the guards that
    ``module()`` ``exec``s, including those it generates from the graph's placeholders) must
    pass :mod:`mpq_core.expr_guard` first. The archive check already refused such programs;
    this holds even without it."""

    def __enter__(self) -> forbid_python_eval:
        import sympy
        from torch.export import _unlift

        real_sympify, real_guards = sympy.sympify, _unlift._convert_guards_code_to_fn

        def checked_sympify(a: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(a, str) and (why := sympy_expr_refusal(a)) is not None:
                self.refuse(_python_refused("shape expression", a, why))
            return real_sympify(a, *args, **kwargs)

        def checked_guards(guards_code: list[str], *args: Any, **kwargs: Any) -> Any:
            for guard in guards_code:
                if (why := guard_refusal(guard)) is not None:
                    self.refuse(_python_refused("guard", guard, why))
            return real_guards(guards_code, *args, **kwargs)

        self._patch(sympy, "sympify", checked_sympify)
        self._patch(_unlift, "_convert_guards_code_to_fn", checked_guards)
        return self


def _python_refused(what: str, text: str, why: str) -> ModelFormatError:
    return ModelFormatError(
        f"the torch.export program holds a {what} {text[:200]!r} ({why}) that torch would "
        "evaluate as Python; mpq refuses it: export the model again with torch.export.save",
        code="model_unsafe_op",
    )


def check_sample_inputs(samples: Mapping[str, bytes]) -> None:
    """Each sample-input record must load with the restricted unpickler, as a tuple or dict."""
    for name, raw in samples.items():
        with forbid_unpickling():
            try:
                value = torch.load(io.BytesIO(raw), weights_only=True)
            except _RefusedUnpickle as exc:
                raise _RefusedUnpickle(_PICKLE_MESSAGE.format(what=name)) from exc
        if not isinstance(value, tuple | dict):
            raise ModelFormatError(
                f"the torch.export archive's {name} is not a tuple of sample inputs",
                code="model_corrupt",
            )


def _kinds(block: Any) -> Iterator[str]:
    for node in block.nodes():
        yield node.kind()
        for sub in node.blocks():
            yield from _kinds(sub)


def check_script_graphs(module: torch.nn.Module) -> None:
    """Refuse a loaded TorchScript module whose (inlined) method graphs use a refused operator."""
    for path, sub in module.named_modules():
        c_module = getattr(sub, "_c", None)
        if c_module is None:
            continue
        for method_name in c_module._method_names():
            method = c_module._get_method(method_name)
            for kind in _kinds(method.inlined_graph):
                namespace, _, name = kind.partition("::")
                why = op_refusal(namespace, name)
                if why is not None:
                    where = f"{path or 'the model'}.{method_name}"
                    raise ModelFormatError(
                        f"the TorchScript model calls {kind} ({why}) in {where}; mpq only loads "
                        "models made of pure tensor operators",
                        code="model_unsafe_op",
                    )
