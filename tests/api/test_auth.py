"""API keys: format, hashed storage, authentication, revocation, pepper; and no torch in api."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.auth import (
    authenticate,
    create_key,
    hash_key,
    new_api_key,
    revoke_key,
    verify,
)
from mpq_service.db import session_scope
from mpq_service.tables import ApiKey, Tenant


def _name() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


def test_key_format() -> None:
    plaintext, prefix, digest = new_api_key()
    assert re.fullmatch(r"mpq_[A-Za-z0-9_-]{32}", plaintext)
    assert prefix == plaintext[:8]
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hash_key(plaintext)
    assert new_api_key()[0] != plaintext


def test_pepper_changes_the_hash() -> None:
    assert hash_key("mpq_x", "pepper-a") != hash_key("mpq_x", "pepper-b")
    assert hash_key("mpq_x", "pepper-a") == hash_key("mpq_x", "pepper-a")
    assert verify("mpq_x", hash_key("mpq_x", "p"), "p")
    assert not verify("mpq_x", hash_key("mpq_x", "p"), "q")
    assert not verify("mpq_y", hash_key("mpq_x", "p"), "p")


def test_only_the_hash_is_stored(engine: Engine, session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as s:
        plaintext = create_key(s, _name(), "ci", pepper="pep")
    body = plaintext[8:]
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).all()
    dumped = repr(rows)
    assert body not in dumped and plaintext not in dumped
    assert hash_key(plaintext, "pep") in dumped


def test_authenticate_right_wrong_and_revoked_keys(
    session_factory: sessionmaker[Session],
) -> None:
    name = _name()
    with session_scope(session_factory) as s:
        first = create_key(s, name, "laptop", pepper="pep")
        second = create_key(s, name, "ci", pepper="pep")  # same tenant, reused
    with session_factory() as s:
        assert s.scalars(select(Tenant).where(Tenant.name == name)).one()
        tenant = authenticate(s, first, pepper="pep")
        assert tenant is not None and tenant.name == name
        again = authenticate(s, second, pepper="pep")
        assert again is not None and again.id == tenant.id
        # Wrong key (same prefix, other body), wrong pepper, garbage.
        assert authenticate(s, first[:-1] + ("A" if first[-1] != "A" else "B"), "pep") is None
        assert authenticate(s, first, pepper="other") is None
        assert authenticate(s, "", pepper="pep") is None
        assert authenticate(s, "Bearer " + first, pepper="pep") is None
    with session_scope(session_factory) as s:
        assert revoke_key(s, first, pepper="pep")
        assert not revoke_key(s, "mpq_" + "x" * 32, pepper="pep")
    with session_factory() as s:
        assert authenticate(s, first, pepper="pep") is None
        assert authenticate(s, second, pepper="pep") is not None
        keys = s.scalars(select(ApiKey).join(Tenant).where(Tenant.name == name)).all()
        revoked = {k.name: k.revoked_at is not None for k in keys}
    assert revoked == {"laptop": True, "ci": False}


def test_tenants_are_kept_apart(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as s:
        a = create_key(s, _name(), "k")
        b = create_key(s, _name(), "k")
    with session_factory() as s:
        ta, tb = authenticate(s, a), authenticate(s, b)
        assert ta is not None and tb is not None and ta.id != tb.id
