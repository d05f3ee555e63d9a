"""What the pages show of a job, as plain values: one summary per job (the history's row, and
what the live updates send), and the formatting of sizes, counts and metrics. Pure functions of
:class:`api.schemas.JobPublic`; no database, no request."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from api.schemas import JobPublic
from mpq_core.progress import STAGES
from mpq_service.job_status import JobStatus

__all__ = [
    "format_bytes",
    "format_count",
    "format_metric",
    "headline_metric",
    "job_summary",
    "stage_timeline",
]

# The metric a job's history shows, first present first: accuracy when the data has labels.
_HEADLINE = ("accuracy", "perplexity", "cosine", "loss")


def format_bytes(n: object) -> str:
    """``1536`` -> ``1.5 KiB``; anything but a number (None, missing) -> an em dash."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns


def format_count(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "—"


def format_metric(value: object, name: str = "") -> str:
    """A metric for reading: accuracy as a percentage, others with four significant digits."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    if name == "accuracy":
        return f"{100 * value:.1f} %"
    return f"{value:.4g}"


def _duration(job: JobPublic, now: datetime) -> str:
    if job.started_at is None:
        return "—"
    seconds = ((job.finished_at or now) - job.started_at).total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return (
        f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
    )


def headline_metric(result: dict[str, Any] | None) -> tuple[str, float | None, float | None]:
    """``(name, before, after)``: the float model's metric and the delivered model's (fine-tuned
    when it was, else quantized); an empty name when the job has no metrics."""
    metrics = (result or {}).get("metrics") or {}
    before = metrics.get("float") or {}
    after = metrics.get("finetuned") or metrics.get("quantized") or {}
    for name in _HEADLINE:
        if before.get(name) is not None:
            return name, before.get(name), after.get(name)
    return "", None, None


def size_reached(result: dict[str, Any] | None) -> int | None:
    """The delivered model's size: the packed checkpoint when written, else the predicted."""
    sizes = (result or {}).get("sizes") or {}
    value = sizes.get("packed_checkpoint_bytes") or sizes.get("predicted_bytes")
    return int(value) if isinstance(value, int | float) else None


def job_summary(job: JobPublic, now: datetime | None = None) -> dict[str, Any]:
    """What the history shows of ``job`` (and the live updates send): JSON-able strings."""
    name, before, after = headline_metric(job.result)
    status = JobStatus(job.status)
    return {
        "id": job.id,
        "status": status.value,
        "stage": job.stage or "",
        "progress": round(job.progress, 4),
        "percent": f"{100 * job.progress:.0f} %",
        "final": status.is_final,
        "budgets": ", ".join(str(b) for b in job.spec.get("budgets", [])),
        "created": job.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "duration": _duration(job, now or datetime.now(timezone.utc)),
        "size": format_bytes(size_reached(job.result)) if job.result else "—",
        "metric": name,
        "before": format_metric(before, name),
        "after": format_metric(after, name),
        "error": job.error.message if job.error else "",
    }


def stage_timeline(job: JobPublic) -> list[dict[str, Any]]:
    """Every stage of a job in order with its state: ``done``, ``current`` (with its progress),
    ``failed`` or ``pending``."""
    status = JobStatus(job.status)
    current = STAGES.index(job.stage) if job.stage in STAGES else -1
    rows = []
    for i, stage in enumerate(STAGES):
        if status == JobStatus.SUCCEEDED or i < current:
            state = "done"
        elif i == current and status == JobStatus.RUNNING:
            state = "current"
        elif i == current and status in (JobStatus.FAILED, JobStatus.CANCELLED):
            state = "failed" if status == JobStatus.FAILED else "cancelled"
        else:
            state = "pending"
        rows.append({"name": stage, "state": state})
    return rows
