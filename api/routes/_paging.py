"""Cursor pagination, newest first: the cursor is opaque to clients (url-safe base64 of the
last item's ``created_at`` and ``id``), stable while rows are added, and uses the
``(tenant_id, created_at DESC, id DESC)`` indexes."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Query
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from api.errors import ApiError

__all__ = ["CursorQuery", "LimitQuery", "decode_cursor", "encode_cursor", "page"]

LimitQuery = Annotated[int, Query(ge=1, le=100, description="items per page")]
CursorQuery = Annotated[
    str | None, Query(max_length=200, description="next_cursor of the previous page")
]


class _Paged(Protocol):
    id: Any
    created_at: Any


T = TypeVar("T", bound=_Paged)


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The ``(created_at, id)`` of a cursor; 400 ``invalid_cursor`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(ident, str) or "\x00" in ident:
            raise ValueError("bad cursor")  # Postgres refuses text holding NUL
        # In UTC, as stored: a time at the edge of the calendar overflows here, not in the query.
        when = when.astimezone(timezone.utc)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError):
        raise ApiError(
            400, "invalid_cursor", "the cursor is not valid; omit it to start over"
        ) from None
    return when, ident


def page(
    session: Session,
    stmt: Select[T],
    created_at: InstrumentedAttribute[datetime],
    ident: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
) -> tuple[Sequence[T], str | None]:
    """One page of ``stmt``'s rows, newest first, and the cursor of the next page (or None)."""
    if cursor:
        when, last = decode_cursor(cursor)
        stmt = stmt.where(or_(created_at < when, and_(created_at == when, ident < last)))
    rows = session.scalars(stmt.order_by(created_at.desc(), ident.desc()).limit(limit + 1)).all()
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
