"""The signature of mpq's webhook calls, and its check for receivers.

Every call carries ``X-MPQ-Signature: t=<unix seconds>,v1=<hex>``, where ``<hex>`` is the
HMAC-SHA256, keyed by the service's webhook secret (``MPQ_WEBHOOK_SECRET``), of
``"<t>." + <the raw request body>``. A receiver recomputes it over the bytes it received (before
parsing them) and refuses a call whose signature differs or whose ``t`` is too old (a replayed
call). Several ``v1=`` values may appear (a secret being rotated): one matching is enough.

Standard library only, so that a receiver imports it without the service's dependencies.

Example:
    >>> from mpq_service.webhook_signature import verify_signature
    >>> def on_post(headers, raw_body):
    ...     if not verify_signature(SECRET, headers["X-MPQ-Signature"], raw_body):
    ...         return 401
    ...     event = json.loads(raw_body)  # {"event": "job.finished", "job": {...}}
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "sign", "signature_header", "verify_signature"]

SIGNATURE_HEADER = "X-MPQ-Signature"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>." + body`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-MPQ-Signature`` value for ``body``, signed now (or at ``timestamp``).

    Example:
        >>> signature_header("s3cret", b"{}", timestamp=1700000000)[:13]
        't=1700000000,'
    """
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    tolerance_s: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (an ``X-MPQ-Signature`` value) signs ``body`` under ``secret``, at a
    time no further than ``tolerance_s`` from now.

    Args:
        secret: the service's webhook secret.
        header: the header's value as received (None or malformed: False).
        body: the request body exactly as received, before any JSON parsing.
        tolerance_s: the oldest (or furthest in the future) signature time accepted.
        now: the current unix time (default: the clock).

    Example:
        >>> body = b'{"event": "job.finished"}'
        >>> verify_signature("s3cret", signature_header("s3cret", body), body)
        True
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
