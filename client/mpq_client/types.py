"""What the API returns, as frozen dataclasses.

Parsed leniently: fields the client does not know are ignored and missing optional ones take
their defaults, so a newer server (with more fields) still works with this client. Times are
timezone-aware :class:`datetime` objects (UTC).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

__all__ = [
    "FINAL_STATUSES",
    "Artifact",
    "Dataset",
    "Job",
    "JobError",
    "Model",
    "Page",
    "parse_time",
]

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")
_FRACTION = re.compile(r"\.(\d+)")  # the fractional seconds of an ISO 8601 time


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from the API (``...Z`` or ``...+00:00``) as an aware datetime; None for
    None or anything unreadable (a lenient parse: a field is never worth a crash)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    fraction = _FRACTION.search(text)
    if fraction:  # Python 3.10 reads only 3 or 6 fractional digits: pad or cut to 6
        digits = fraction.group(1)[:6].ljust(6, "0")
        text = f"{text[: fraction.start()]}.{digits}{text[fraction.end() :]}"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _known(cls: type[Any], doc: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


@dataclass(frozen=True)
class _Upload:
    id: str
    filename: str = ""
    format: str = ""
    size: int = 0
    sha256: str = ""
    created_at: datetime | None = None

    @classmethod
    def _parse(cls, doc: Mapping[str, Any]) -> dict[str, Any]:
        values = _known(cls, doc)
        values["created_at"] = parse_time(doc.get("created_at"))
        return values


@dataclass(frozen=True)
class Model(_Upload):
    """An uploaded model; ``format`` is what the API detected (``torchscript`` or ``export``)."""

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> Model:
        return cls(**cls._parse(doc))


@dataclass(frozen=True)
class Dataset(_Upload):
    """An uploaded calibration or evaluation data file (``npz`` or ``safetensors``)."""

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> Dataset:
        return cls(**cls._parse(doc))


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` and a ``message`` saying what to fix."""

    code: str
    message: str = ""


@dataclass(frozen=True)
class Job:
    """A job as the API reports it. ``status`` is ``queued``, ``running``, ``succeeded``,
    ``failed`` or ``cancelled``; ``stage`` the pipeline stage while it runs; ``progress`` 0..1;
    ``error`` set once it failed; ``result`` the worker's summary once it succeeded."""

    id: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    model_id: str | None = None  # None once the model was deleted
    dataset_id: str | None = None  # None once the dataset was deleted
    eval_dataset_id: str | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 0
    error: JobError | None = None
    result: Mapping[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> Job:
        values = _known(cls, doc)
        error = doc.get("error")
        values["error"] = (
            JobError(str(error.get("code", "unknown")), str(error.get("message", "")))
            if isinstance(error, Mapping)
            else None
        )
        values["progress"] = float(doc.get("progress") or 0.0)
        for name in ("created_at", "started_at", "finished_at", "updated_at"):
            values[name] = parse_time(doc.get(name))
        return cls(**values)


@dataclass(frozen=True)
class Artifact:
    """One output file of a job; download it with :meth:`mpq_client.Client.download`."""

    name: str
    size: int = 0
    sha256: str = ""
    content_type: str = "application/octet-stream"
    url: str = ""
    created_at: datetime | None = None

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> Artifact:
        values = _known(cls, doc)
        values["created_at"] = parse_time(doc.get("created_at"))
        return cls(**values)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: its ``items``, the cursor of the next page (None on the last one)
    and ``total``, the number of matching items over all pages (None when the server does not
    report it)."""

    items: list[T]
    next_cursor: str | None = None
    total: int | None = None
