"""Reading a server-sent event stream (``text/event-stream``) as a client does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx

__all__ = ["Event", "sse_events"]


@dataclass(frozen=True)
class Event:
    """One dispatched event, or a comment line (``event == ""``, ``comment`` set)."""

    event: str
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None


def sse_events(response: httpx.Response, *, comments: bool = False) -> Iterator[Event]:
    """The events of ``response`` in order, as the SSE spec parses its lines (a ``retry:`` alone
    comes as an event named ``""``); comments too when ``comments``. Ends with the stream."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                retry = fields.get("retry")
                yield Event(
                    fields.get("event", "message" if "data" in fields else ""),
                    fields.get("data", ""),
                    fields.get("id"),
                    int(retry) if retry else None,
                )
            fields = {}
        elif line.startswith(":"):
            if comments:
                yield Event("", comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = (
                f"{fields[name]}\n{value}" if name == "data" and name in fields else value
            )
