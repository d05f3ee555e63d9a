"""The job spec as JSON Schema, for the OpenAPI document: read off the dataclasses of
:mod:`mpq_core.spec` (field types, defaults, help texts, enums), so it cannot drift from what the
API validates.

mpq_core knows nothing of JSON Schema or pydantic; the spec's own checks
(:meth:`mpq_core.spec.JobSpec.validate`) stay the authority. The schema adds only bounds that are
plain facts of those checks (bit widths, list lengths).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from mpq_core import spec as spec_module
from mpq_core.spec import SCHEMA_VERSION, AnalysisSpec, FinetuneSpec, JobSpec

__all__ = ["SPEC_COMPONENTS", "job_spec_schemas"]

#: The component names of the spec's parts, as they appear under ``#/components/schemas``.
SPEC_COMPONENTS = {JobSpec: "JobSpec", AnalysisSpec: "AnalysisSpec", FinetuneSpec: "FinetuneSpec"}

_BITS = {"type": "integer", "enum": [2, 3, 4, 5, 6, 7, 8, 16]}
# Plain facts of mpq_core.spec's checks, named by field.
_BOUNDS: dict[str, dict[str, Any]] = {
    "budgets": {"minItems": 1, "maxItems": spec_module.MAX_BUDGETS},
    "sweep": {"maxItems": spec_module.MAX_BUDGETS},
    "ties": {"maxItems": spec_module.MAX_PATTERNS},
    "bits": {"minItems": 1, "maxItems": spec_module.MAX_BIT_ENTRIES, "items": _BITS},
    "pins": {"additionalProperties": _BITS},
    "act_bits": {"minimum": 2, "maximum": 16},
    "eval_fraction": {"minimum": 0, "maximum": 0.9},
    "val_fraction": {"minimum": 0, "maximum": 0.9},
    "batch_size": {"minimum": 1, "maximum": spec_module.MAX_BATCH},
    "epochs": {"minimum": 0, "maximum": spec_module.MAX_EPOCHS},
    "seed": {"minimum": 0, "maximum": spec_module.MAX_SEED},
}
_EXAMPLES: dict[str, list[Any]] = {
    "budgets": [["avg-bits=4"], ["size=1.5MB", "bitops=1.2G"]],
    "pins": [{"conv1\\.weight": 8}],
    "sweep": [["avg-bits=2:8:0.5"]],
    "max_memory": ["8GB", 8589934592],
    "output_key": ["logits", 0],
}


def _type_schema(hint: Any) -> dict[str, Any]:
    """JSON Schema of a field's type hint (the kinds the spec uses)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in typing.get_args(hint)]
        return {"anyOf": options}
    if hint is type(None):
        return {"type": "null"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [m.value for m in hint]}
    if hint in SPEC_COMPONENTS:
        return {"$ref": f"#/components/schemas/{SPEC_COMPONENTS[hint]}"}
    if origin is list:
        return {"type": "array", "items": _type_schema(typing.get_args(hint)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(typing.get_args(hint)[1])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if hint in simple:
        return {"type": simple[hint]}
    return {}  # Any: whatever JSON the spec's own check accepts


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    if dataclasses.is_dataclass(value):
        return None  # a nested part: its own schema gives the defaults
    return value.value if isinstance(value, enum.Enum) else value


def _object_schema(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        prop = {**_type_schema(hints[field.name]), **_BOUNDS.get(field.name, {})}
        prop["description"] = field.metadata.get("help", "")
        default = _default(field)
        if default is not dataclasses.MISSING and default is not None:
            prop["default"] = default
        if field.name in _EXAMPLES:
            prop["examples"] = _EXAMPLES[field.name]
        properties[field.name] = prop
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        "properties": properties,
        "additionalProperties": False,
    }


def job_spec_schemas() -> dict[str, dict[str, Any]]:
    """``{component name: schema}`` for the job spec and its nested parts."""
    schemas = {name: _object_schema(cls) for cls, name in SPEC_COMPONENTS.items()}
    top = schemas["JobSpec"]
    top["description"] = (
        "What `mpq quantize` accepts, as JSON: every field but `budgets` has a default. Unknown "
        "fields are refused with 422. (Flat version 1 documents of older clients are still "
        "read; they are not described here.)"
    )
    top["properties"] = {
        "schema_version": {"type": "integer", "enum": [1, SCHEMA_VERSION], "default": 2},
        "kind": {"type": "string", "enum": ["mpq.job_spec"]},
        **top["properties"],
    }
    top["required"] = ["budgets"]
    return schemas
