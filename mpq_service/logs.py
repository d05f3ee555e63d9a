"""The service's log lines: JSON (one object per line) or text, with the request or job they
belong to.

The API sets :data:`request_id` for the length of each request (:mod:`api.request_id`); the
worker sets :data:`job_id` while it runs a job (:func:`job_context`). Every line logged meanwhile
carries them, whoever logs it (our code, SQLAlchemy, Celery, uvicorn), because the formatters read
them at format time. ``MPQ_LOG_FORMAT`` picks the format: ``json`` for log collectors, ``text``
for people, ``auto`` (the default) text when stderr is a terminal and JSON otherwise.

A JSON line holds ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``request_id`` and
``job_id`` when set, ``exc`` (the traceback as one string) when there is one, and the fields a
caller passed with ``extra=``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

__all__ = [
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "job_context",
    "job_id",
    "make_formatter",
    "request_id",
    "resolve_format",
    "setup_logging",
]

LogFormat = Literal["auto", "json", "text"]

#: The id of the API request being served (set by the API's request-id middleware).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mpq_request_id", default=None
)
#: The id of the job the worker is running.
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mpq_job_id", default=None)

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message", "request_id", "job_id"}
)


@contextlib.contextmanager
def job_context(job: str) -> Iterator[None]:
    """Every line logged inside carries ``job_id=job`` (threads started inside too, if they
    run in a copy of this context, see :class:`worker.heartbeat.Heartbeat`)."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)


def _context(record: logging.LogRecord) -> dict[str, str]:
    """The request and job a record belongs to: passed with ``extra=``, else the context's."""
    found = {}
    for name, var in (("request_id", request_id), ("job_id", job_id)):
        value = getattr(record, name, None) or var.get()
        if value:
            found[name] = str(value)
    return found


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring); never raises on odd extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context(record))
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message> [request_id=... job_id=...]`` for people."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {super().format(record)}"
        context = _context(record)
        if context:
            first, newline, rest = text.partition("\n")  # after the message, before a traceback
            tags = " ".join(f"{k}={v}" for k, v in context.items())
            text = f"{first} [{tags}]{newline}{rest}"
        return text


def resolve_format(setting: str, stream: TextIO | None = None) -> Literal["json", "text"]:
    """``json`` or ``text`` for the setting ``MPQ_LOG_FORMAT``; ``auto`` is text on a terminal
    (a person reads it) and JSON elsewhere (a container, a service manager, a file: a
    collector parses it)."""
    if setting in ("json", "text"):
        return setting  # type: ignore[return-value]
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def make_formatter(setting: str) -> logging.Formatter:
    """The formatter for ``MPQ_LOG_FORMAT=setting``."""
    return JsonFormatter() if resolve_format(setting) == "json" else TextFormatter()


def setup_logging(setting: str, *, level: int = logging.INFO) -> None:
    """Send every logger's lines to stderr in the chosen format: the root logger gets one
    handler (replacing any), third-party loggers keep their own levels (warnings and up, by
    default), mpq's own (``mpq``, ``api``, ``worker``, ``mpq_service``) log from ``level`` up.

    Example:
        >>> setup_logging(get_settings().log_format)
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(setting))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)  # warnings are log lines too, in the same format
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in ("mpq", "api", "worker", "mpq_service"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for old in list(logger.handlers):  # e.g. an earlier text setup: one line per record
            logger.removeHandler(old)
        logger.propagate = True
