"""API keys: made once, shown once, stored only as an HMAC-SHA256 hash.

A key reads ``mpq_<32 url-safe characters>`` (about 190 random bits). Its first 8 characters
(``prefix``) are stored in clear so a user can tell their keys apart and so lookup narrows to a
few rows before the constant-time hash comparison. The pepper (``MPQ_API_KEY_PEPPER``) is a
server-side secret mixed into every hash: a leaked database alone cannot be used to test guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from mpq_core.errors import MpqError
from mpq_service.tables import ApiKey, Tenant, utcnow

__all__ = [
    "KEY_PREFIX",
    "PREFIX_LENGTH",
    "KeyNotFound",
    "authenticate",
    "create_key",
    "hash_key",
    "list_keys",
    "new_api_key",
    "revoke_key",
    "revoke_key_ref",
    "verify",
]

KEY_PREFIX = "mpq_"
PREFIX_LENGTH = 8
_RANDOM_CHARS = 32


def hash_key(plaintext: str, pepper: str = "") -> str:
    """HMAC-SHA256 of the key under the pepper, as 64 hex characters.

    Example:
        >>> hash_key("mpq_abc", pepper="s3cret") != hash_key("mpq_abc", pepper="other")
        True
    """
    return hmac.new(pepper.encode(), plaintext.encode(), hashlib.sha256).hexdigest()


def verify(plaintext: str, stored_hash: str, pepper: str = "") -> bool:
    """Whether ``plaintext`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(plaintext, pepper), stored_hash)


def new_api_key(pepper: str = "") -> tuple[str, str, str]:
    """A fresh key as ``(plaintext, prefix, hash)``; only the prefix and hash are to be stored.

    Example:
        >>> plaintext, prefix, digest = new_api_key()
        >>> plaintext.startswith("mpq_") and plaintext[:8] == prefix
        True
    """
    body = secrets.token_urlsafe(32)[:_RANDOM_CHARS]  # 43 chars from 32 bytes; keep 32
    plaintext = KEY_PREFIX + body
    return plaintext, plaintext[:PREFIX_LENGTH], hash_key(plaintext, pepper)


def create_key(session: Session, tenant_name: str, key_name: str, pepper: str = "") -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if new); returns the plaintext.

    The plaintext is not kept anywhere: show it to the user once. The caller commits.

    Example:
        >>> with session_scope(factory) as session:
        ...     key = create_key(session, "acme", "ci", pepper=settings.api_key_pepper.get_secret_value())
    """
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    plaintext, prefix, digest = new_api_key(pepper)
    session.add(ApiKey(tenant_id=tenant.id, name=key_name, prefix=prefix, hash=digest))
    session.flush()
    return plaintext


def _find_key(session: Session, plaintext: str, pepper: str) -> ApiKey | None:
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 256:
        return None
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == plaintext[:PREFIX_LENGTH])
    ).all()
    # Hash once, then compare against every candidate without an early exit.
    found: ApiKey | None = None
    digest = hash_key(plaintext, pepper)
    for key in candidates:
        if hmac.compare_digest(digest, key.hash):
            found = key
    return found


def authenticate(session: Session, plaintext: str, pepper: str = "") -> Tenant | None:
    """The tenant owning the key ``plaintext``, or None if it is unknown or revoked.

    Example:
        >>> tenant = authenticate(session, request_bearer_token, pepper)
    """
    key = _find_key(session, plaintext, pepper)
    if key is None or key.revoked_at is not None:
        return None
    return key.tenant


def revoke_key(session: Session, plaintext: str, pepper: str = "") -> bool:
    """Mark the key revoked (kept for the record); False if no such key. The caller commits."""
    key = _find_key(session, plaintext, pepper)
    if key is None:
        return False
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return True


class KeyNotFound(MpqError):
    """``mpq keys revoke`` was given a reference that names no key, or more than one."""

    code = "key_not_found"


def list_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key (or ``tenant_name``'s), oldest first, with its tenant's name; revoked keys
    included (they are kept for the record)."""
    stmt = select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
    if tenant_name is not None:
        stmt = stmt.where(Tenant.name == tenant_name)
    rows = session.execute(stmt.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [(key, name) for key, name in rows]


def revoke_key_ref(session: Session, ref: str, tenant_name: str | None = None) -> ApiKey:
    """Revoke the key whose id or prefix is ``ref`` (as ``mpq keys list`` shows them); the
    key row. Revoking a revoked key changes nothing. The caller commits.

    Raises:
        KeyNotFound: no key matches, or a prefix matches several (then give the id).
    """
    stmt = select(ApiKey).join(Tenant, ApiKey.tenant_id == Tenant.id)
    stmt = stmt.where(or_(ApiKey.id == ref, ApiKey.prefix == ref))
    if tenant_name is not None:
        stmt = stmt.where(Tenant.name == tenant_name)
    matches = session.scalars(stmt).all()
    if not matches:
        raise KeyNotFound(f"no API key has the id or prefix {ref!r}; see `mpq keys list`")
    if len(matches) > 1:
        ids = ", ".join(k.id for k in matches)
        raise KeyNotFound(f"the prefix {ref!r} names {len(matches)} keys ({ids}); give the id")
    key = matches[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key
