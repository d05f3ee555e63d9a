"""Model intake: detect the format from content, load it safely, refuse what mpq cannot use.

Only two formats are accepted, both loadable without running arbitrary Python: TorchScript
archives (``torch.jit.save``) and torch.export programs (``torch.export.save``). A pickled
``nn.Module`` or state_dict is refused *before* anything is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mpq_core.archive_guard import DEFAULT_LIMITS, ArchiveLimits, check_model_archive
from mpq_core.errors import DataMismatch, ModelFormatError, MpqError
from mpq_core.load_guard import (
    check_sample_inputs,
    check_script_graphs,
    forbid_python_eval,
    forbid_unpickling,
)
from mpq_core.mapped_file import Buffer, as_file, mapped

__all__ = ["InputSpec", "LoadedModel", "detect_format", "load_model", "select_output"]

ModelFormat = Literal["torchscript", "export"]

# Pickle streams start with PROTO (0x80) then the protocol number; torch.save's legacy format too.
_PICKLE_MAGIC = b"\x80"


@dataclass(frozen=True)
class InputSpec:
    """What one positional input must look like; ``None`` in ``shape`` means any size."""

    shape: tuple[int | None, ...] | None
    dtype: torch.dtype | None


@dataclass
class LoadedModel:
    """A user model ready to run: the callable module plus what mpq learned about it."""

    format: ModelFormat
    module: torch.nn.Module
    sha256: str
    num_inputs: int
    input_specs: list[InputSpec] = field(default_factory=list)
    # A torch.export program traced with a fixed batch size only runs at that size.
    fixed_batch: int | None = None
    # The ExportedProgram behind ``module`` (torch.export only); the module shares its weights.
    program: Any = None

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter, by qualified name; a tensor shared under several names (tied
        weights, which a torch.export program lists once per name) appears once."""
        seen: set[tuple[int, tuple[int, ...]]] = set()
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            key = (p.data_ptr(), tuple(p.shape))
            if key not in seen:
                seen.add(key)
                out[name] = p
        return out

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.module(*inputs)

    @property
    def suffix(self) -> str:
        return ".pt2" if self.format == "export" else ".pt"

    def save(self, target: str | Path | io.BytesIO) -> None:
        """Write the model, with its current weights, in the format it was uploaded in; the
        file loads with stock ``torch.jit.load`` / ``torch.export.load``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.format == "torchscript":
                torch.jit.save(self.module, target)
            else:
                torch.export.save(self.program, target)


def _zip_names(data: Buffer) -> list[str] | None:
    """Entry names of a zip that spans the whole file, else None.

    A torch.export archive stores a complete torch.save zip inside it; when the outer archive is
    cut off, zipfile would find that inner directory instead. Only a directory whose first entry
    starts at byte 0 describes the file itself.
    """
    try:
        with zipfile.ZipFile(as_file(data)) as zf:
            infos = zf.infolist()
            if not infos or min(i.header_offset for i in infos) != 0:
                return None
            return [i.filename for i in infos]
    except zipfile.BadZipFile:
        return None


def _looks_truncated_zip(data: Buffer) -> bool:
    # A zip whose central directory was cut off still starts with a local file header.
    return data[:4] == b"PK\x03\x04"


def detect_format(data: Buffer) -> ModelFormat:
    """Tell a TorchScript archive from a torch.export program by its content.

    Raises:
        ModelFormatError: with code ``model_pickle`` for a torch.save'd module or state_dict,
            ``model_truncated`` for a cut-off archive, ``model_format`` for anything else.
    """
    if not data:
        raise ModelFormatError("the model file is empty", code="model_format")
    names = _zip_names(data)
    if names is None:
        if _looks_truncated_zip(data):
            raise ModelFormatError(
                "the model archive is truncated or corrupt (its zip directory is missing); "
                "upload the complete file written by torch.jit.save or torch.export.save",
                code="model_truncated",
            )
        if data[:1] == _PICKLE_MAGIC:
            raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
        raise ModelFormatError(
            "not a TorchScript archive or torch.export program; save the model with "
            "torch.jit.save(torch.jit.script(model), 'model.pt') or "
            "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')",
            code="model_format",
        )
    rel = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in rel or any(n.startswith("models/") and n.endswith(".json") for n in rel):
        return "export"
    if "constants.pkl" in rel and any(n.startswith("code/") for n in rel):
        return "torchscript"
    if "data.pkl" in rel:
        raise ModelFormatError(_PICKLE_MESSAGE, code="model_pickle")
    raise ModelFormatError(
        "a zip file that is neither a TorchScript archive nor a torch.export program",
        code="model_format",
    )


_PICKLE_MESSAGE = (
    "this is a pickled nn.Module or state_dict (torch.save); mpq never unpickles uploads because "
    "loading them runs arbitrary code. Export the model instead: "
    "torch.jit.save(torch.jit.script(model), 'model.pt') or "
    "torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
)


def _torch_source(source: bytes | Path) -> io.BytesIO | str:
    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def _load_torchscript(source: bytes | Path) -> tuple[torch.nn.Module, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(_torch_source(source), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ModelFormatError(
                f"the TorchScript archive cannot be loaded: {_first_line(exc)}",
                code="model_corrupt",
            ) from exc
    if not any(p.dim() > 0 for p in module.parameters()):
        raise ModelFormatError(
            "this TorchScript model is frozen (torch.jit.freeze folded its weights into "
            "constants), so there are no parameters left to quantize; save it before freezing",
            code="model_frozen",
        )
    check_script_graphs(module)  # exact node kinds, after the source check before loading
    schema = module.forward.schema
    num_inputs = len(schema.arguments) - 1  # minus self
    return module, num_inputs


def _retie_weights(module: torch.nn.Module) -> None:
    """Make every name of a tied weight refer to one Parameter, as in the eager model.

    ``ExportedProgram.module()`` gives each name of a tied weight (T5's ``shared``,
    ``encoder.embed_tokens`` and ``lm_head``) its own Parameter over the same storage, and the
    graph reads whichever name it was traced with; gradients would then land on an alias that
    sensitivities and fine-tuning never look at.
    """
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.nn.Parameter] = {}
    for name, param in list(module.named_parameters(remove_duplicate=False)):
        key = (param.data_ptr(), tuple(param.shape), tuple(param.stride()))
        owner = first.setdefault(key, param)
        if owner is param:
            continue
        prefix, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(prefix) if prefix else module, leaf, owner)


def _load_export(source: bytes | Path) -> tuple[Any, torch.nn.Module, list[InputSpec], int | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with forbid_unpickling(), forbid_python_eval():
                program = torch.export.load(_torch_source(source))
        except MpqError:
            raise
        except Exception as exc:  # torch raises many types here; all mean "cannot load"
            raise ModelFormatError(
                f"the torch.export program cannot be loaded: {_first_line(exc)}",
                code="model_corrupt",
            ) from exc
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs: list[InputSpec] = []
    fixed_batch: int | None = None
    for i, name in enumerate(program.graph_signature.user_inputs):
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, torch.Tensor):
            shape = tuple(d if isinstance(d, int) else None for d in val.shape)
            specs.append(InputSpec(shape=shape, dtype=val.dtype))
            if i == 0 and shape and shape[0] is not None:
                fixed_batch = shape[0]
        else:
            specs.append(InputSpec(shape=None, dtype=None))
    with forbid_python_eval():  # module() execs the program's guards
        module = program.module()
    _retie_weights(module)
    if not any(p.dim() > 0 for p in module.parameters()):
        raise ModelFormatError(
            "this torch.export program has no parameters to quantize (weights were lifted to "
            "constants); export the model without freezing",
            code="model_frozen",
        )
    return program, module, specs, fixed_batch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextmanager
def _content(source: bytes | Path) -> Iterator[Buffer]:
    if isinstance(source, bytes):
        yield source
    else:
        with mapped(source) as data:
            yield data


def load_model(
    source: str | Path | bytes, *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> LoadedModel:
    """Load a TorchScript archive or torch.export program, detected from its content.

    Nothing is deserialised before :func:`mpq_core.archive_guard.check_model_archive` (zip
    bombs, pickled parts, operators outside the allow-list) and the restricted-unpickler check
    of the sample inputs have passed.

    Args:
        source: a path or the file's bytes.
        limits: how far the archive may expand (the service passes its own, from its upload
            limit).

    Example:
        >>> model = load_model("model.pt")  # doctest: +SKIP
        >>> model.format
        'torchscript'
    """
    if not isinstance(source, bytes):
        source = Path(source)
    with _content(source) as data:
        fmt = detect_format(data)
        samples = check_model_archive(data, fmt, limits)
        check_sample_inputs(samples)
        sha = hashlib.sha256(data).hexdigest()
    # The mapping is closed: torch reads the weights from the file, so the file is not held
    # twice. The file is the one just checked: uploads are read-only in the job's sandbox.
    if fmt == "torchscript":
        module, n = _load_torchscript(source)
        module.eval()
        return LoadedModel(format=fmt, module=module, sha256=sha, num_inputs=n)
    program, module, specs, fixed_batch = _load_export(source)
    return LoadedModel(
        program=program,
        format=fmt,
        module=module,
        sha256=sha,
        num_inputs=len(specs),
        input_specs=specs,
        fixed_batch=fixed_batch,
    )


def select_output(out: Any, key: str | int | None = None) -> torch.Tensor:
    """The tensor mpq scores: ``out`` itself, or the first floating tensor of a tuple/list/dict.

    Args:
        out: what the model returned.
        key: pick a dict key or tuple index instead of the first floating tensor.
    """
    if key is not None:
        try:
            picked = out[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise DataMismatch(f"model output has no element {key!r}") from exc
        if not isinstance(picked, torch.Tensor):
            raise DataMismatch(f"model output element {key!r} is not a tensor")
        return picked
    if isinstance(out, torch.Tensor):
        return out
    items: Sequence[Any]
    if isinstance(out, Mapping):
        items = list(out.values())
    elif isinstance(out, list | tuple):
        items = out
    else:
        raise DataMismatch(f"model returned {type(out).__name__}; expected tensors")
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
        if isinstance(item, list | tuple | Mapping):
            try:
                return select_output(item)
            except DataMismatch:
                continue
    raise DataMismatch("model output holds no floating-point tensor to score")
