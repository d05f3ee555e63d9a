"""Which operators an uploaded model may call: the data behind intake's operator checks.

A TorchScript archive is source code that ``torch.jit.load`` compiles and partly runs (the
``__setstate__`` of scripted classes runs at load time), and a torch.export program names the
callable of every graph node as a string that the loader resolves with ``getattr`` on ``torch``
(any callable is accepted, ``torch.os.system`` included). So every operator a model names is
checked against this list before anything is loaded.

The rule, in order:

1. the namespace must be one of :data:`ALLOWED_NAMESPACES` (pure tensor maths: ``aten``, ``prim``
   and the quantized kernels). Custom-op namespaces, ``c10d`` (network collectives),
   ``debugprims::load_tensor`` (reads files), ``inductor`` (raw storage) and the rest are refused;
2. the operator must not be in :data:`DENIED_OPS` (file, network and raw-storage operators of the
   allowed namespaces, each with the reason), nor take an argument that names a file in the op
   registry (``torch._C._jit_get_all_schemas()``: today ``aten::from_file`` and ``aten::save``;
   a future torch that adds such an operator is refused without a change here).

Everything the test zoo uses (``tests/real_zoo.py``, traced, scripted and exported) passes; the
zoo test in ``tests/mpq_core/test_archive_guard.py`` keeps it that way.

Pure Python: torch is imported only when the registry is first consulted.
"""

from __future__ import annotations

import functools

__all__ = [
    "ALLOWED_NAMESPACES",
    "DENIED_OPS",
    "EXPORT_PYTHON_TARGETS",
    "FILE_ARGUMENT_NAMES",
    "denied_names",
    "denied_tensor_methods",
    "export_target_refusal",
    "op_refusal",
]

#: Operator namespaces whose operators are pure tensor, list, string and control-flow maths.
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "quantized", "_quantized"})

#: Operators of the allowed namespaces that reach outside the process's tensors, and why.
DENIED_OPS: dict[str, str] = {
    "from_file": "maps any file of the machine into a tensor",
    "save": "writes a file",
    "load": "reads a file",
    "set_": "points a tensor at another storage (raw memory aliasing)",
    "_nested_view_from_buffer": "builds tensors over a raw buffer at given offsets",
    "_nested_view_from_buffer_copy": "builds tensors over a raw buffer at given offsets",
    "rpc_async": "sends a remote procedure call over the network",
    "rpc_sync": "sends a remote procedure call over the network",
    "rpc_remote": "sends a remote procedure call over the network",
    "to_here": "fetches a remote value over the network",
}

#: Argument names that, in the op registry, mean "a path on this machine".
FILE_ARGUMENT_NAMES = frozenset({"filename", "file", "path", "filepath", "file_name", "dir"})

#: Plain-Python callables a torch.export graph may name (the loader's symbolic-shape ops), as
#: serialised: ``_operator.<name>``, ``math.<name>``, ``torch.<name>``.
EXPORT_PYTHON_TARGETS = frozenset(
    {f"_operator.{n}" for n in ("eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add")}
    | {f"_operator.{n}" for n in ("sub", "floordiv", "mod", "pow", "truediv", "and_", "or_")}
    | {"_operator.lshift", "_operator.rshift", "_operator.getitem", "math.trunc"}
    | {f"torch.{n}" for n in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max")}
    | {"torch.sym_min", "torch.sym_sqrt"}
)

#: Higher-order operators (``torch.ops.higher_order.<name>``) that only run subgraphs of the
#: same program, whose nodes are checked too.
EXPORT_HIGHER_ORDER = frozenset(
    {"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
)


@functools.cache
def _registry_file_ops() -> frozenset[str]:
    """Names of allowed-namespace operators with an argument naming a file, from the registry."""
    import torch  # the registry is torch's; imported only here so this module stays pure

    names = set()
    for schema in torch._C._jit_get_all_schemas():
        ns, _, name = schema.name.partition("::")
        if ns in ALLOWED_NAMESPACES and any(
            a.name in FILE_ARGUMENT_NAMES for a in schema.arguments
        ):
            names.add(name)
    return frozenset(names)


def denied_names() -> frozenset[str]:
    """Every operator name refused in any allowed namespace."""
    return frozenset(DENIED_OPS) | _registry_file_ops()


@functools.cache
def denied_tensor_methods() -> frozenset[str]:
    """The refused names that are also methods of a tensor (``x.set_(y)``)."""
    import torch

    return frozenset(n for n in denied_names() if hasattr(torch.Tensor, n))


def op_refusal(namespace: str, name: str) -> str | None:
    """Why ``namespace::name`` is refused, or None when the model may call it."""
    if namespace not in ALLOWED_NAMESPACES:
        return f"operator namespace '{namespace}' is not one of {sorted(ALLOWED_NAMESPACES)}"
    base = name.split(".", 1)[0]  # an overload name ("add.Tensor") does not change the operator
    if base in DENIED_OPS:
        return DENIED_OPS[base]
    if base in _registry_file_ops():
        return "takes a file name"
    return None


def export_target_refusal(target: str) -> str | None:
    """Why a torch.export graph node's serialised target is refused, or None.

    Accepted: ``torch.ops.<namespace>.<op>.<overload>`` passing :func:`op_refusal`, the
    higher-order operators in ``EXPORT_HIGHER_ORDER`` and the callables in
    ``EXPORT_PYTHON_TARGETS``. Anything else would be resolved by ``getattr`` on ``torch``,
    ``math`` or ``operator`` and called with the graph's arguments.
    """
    if target in EXPORT_PYTHON_TARGETS:
        return None
    parts = target.split(".")
    if len(parts) >= 4 and parts[:2] == ["torch", "ops"]:
        if parts[2] == "higher_order":
            if len(parts) == 4 and parts[3] in EXPORT_HIGHER_ORDER:
                return None
            return f"higher-order operator '{target}' is not allowed"
        if len(parts) > 5:
            return "not an operator name"
        return op_refusal(parts[2], parts[3])
    return "not an operator of torch.ops (a plain Python callable would be called)"
