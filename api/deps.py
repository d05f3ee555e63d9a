"""Request dependencies as short ``Annotated`` aliases, so route signatures read like prose.

Everything comes from ``app.state`` (filled by :func:`api.app.create_app`), never from
module globals: each app, and each test, has its own settings, database and storage.

No request holds a database connection while it waits on its client: the API key is checked in
a short session of its own (its connection goes back to the pool at once), and the request's
session (``SessionDep``) takes a connection only when a route first uses it; the upload routes
use it only after the body has been streamed to storage, to insert the rows. So a slow or
stalled uploader costs a socket and a little memory, never a pool slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.auth import authenticate
from api.errors import Unauthorized
from api.queue import Enqueue
from mpq_service.settings import Settings
from mpq_service.storage import Storage
from mpq_service.tables import Tenant

__all__ = [
    "CurrentTenant",
    "EnqueueDep",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
    "UploadContext",
    "UploadContextDep",
    "tenant_for_key",
]

_bearer = HTTPBearer(auto_error=False, description="an API key made by `mpq keys create`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_enqueue(request: Request) -> Enqueue:
    enqueue: Enqueue = request.app.state.enqueue
    return enqueue


def get_session(request: Request) -> Iterator[Session]:
    """A session for the request; routes commit what they change, the rest is rolled back."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
SessionDep = Annotated[Session, Depends(get_session)]


def get_current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant owning the request's bearer API key; 401 when it is missing or unknown.

    Looked up in a session closed before this returns: the tenant comes back detached (its
    columns loaded), and no connection stays checked out for the rest of the request.
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = tenant_for_key(request, credentials.credentials)
    if tenant is None:
        raise Unauthorized("unknown or revoked API key")
    return tenant


def tenant_for_key(request: Request, plaintext: str) -> Tenant | None:
    """The tenant owning the API key ``plaintext`` (None if unknown or revoked), looked up in a
    session closed before this returns: the tenant comes back detached (its columns loaded).
    The bearer auth and the web pages' cookie both resolve keys here."""
    settings: Settings = request.app.state.settings
    pepper = settings.api_key_pepper.get_secret_value()
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    with factory() as session:
        return authenticate(session, plaintext, pepper)


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


@dataclass(frozen=True)
class UploadContext:
    """What every upload route needs: the tenant that will own the files, the storage they go
    to, the settings holding the size limit, and the session their rows are inserted with
    (it takes a database connection only then, after the body was streamed)."""

    session: Session
    tenant: Tenant
    storage: Storage
    settings: Settings


def get_upload_context(
    session: SessionDep, tenant: CurrentTenant, storage: StorageDep, settings: SettingsDep
) -> UploadContext:
    return UploadContext(session, tenant, storage, settings)


UploadContextDep = Annotated[UploadContext, Depends(get_upload_context)]
