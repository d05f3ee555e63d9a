"""``/v1/jobs/{id}/artifacts``: a job's output files, listed and downloaded (streamed by the
API, or a 307 to a presigned storage URL when the backend has one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, StorageDep
from api.errors import NotFound
from api.ownership import get_owned
from api.ranges import etag_of, not_modified, repr_digest, requested_range
from api.routing import SessionReleasingRoute
from api.schemas import ArtifactList, ArtifactPublic
from mpq_service.storage import (
    ARTIFACT_CONTENT_TYPES,
    DEFAULT_CHUNK,
    ObjectNotFound,
    Storage,
    content_disposition,
)
from mpq_service.tables import Artifact, Job

router = APIRouter(prefix="/jobs", tags=["artifacts"], route_class=SessionReleasingRoute)

PRESIGN_EXPIRES_S = 3600


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, session: SessionDep, tenant: CurrentTenant) -> ArtifactList:
    """The job's output files (empty until the job has produced some)."""
    job = get_owned(session, Job, job_id, tenant)
    rows = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)
    ).all()
    return ArtifactList(items=[ArtifactPublic.of(a) for a in rows])


def _stream(f: BinaryIO, length: int) -> Iterator[bytes]:
    """``length`` bytes of ``f``, chunk by chunk; closes it."""
    try:
        while length > 0 and (data := f.read(min(DEFAULT_CHUNK, length))):
            length -= len(data)
            yield data
    finally:
        f.close()


_FILE_HEADERS = {
    "ETag": {"description": "the quoted sha256 of the file", "schema": {"type": "string"}},
    "Repr-Digest": {"description": "RFC 9530: sha-256 of the file", "schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}


# Served with the type it was stored with: JSON, SVG and PNG by suffix, else octets.
_FILE_TYPES: dict[str, Any] = {
    t: {} for t in sorted({*ARTIFACT_CONTENT_TYPES.values(), "application/octet-stream"})
}
_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": _FILE_TYPES,
        "description": "the file",
        "headers": _FILE_HEADERS,
    },
    206: {
        "content": _FILE_TYPES,
        "description": "the byte range asked for in `Range` (one range)",
        "headers": {**_FILE_HEADERS, "Content-Range": {"schema": {"type": "string"}}},
    },
    304: {"description": "`If-None-Match` names the file's ETag: your copy is current"},
    307: {"description": "download it from the presigned URL in Location"},
}


def artifact_response(
    request: Request, session: Session, storage: Storage, job: Job, name: str
) -> Response:
    """The response to a GET or HEAD of the job's artifact ``name`` (the caller has checked
    that the job is the tenant's): a 307 to a presigned URL, or the bytes streamed with their
    ETag, digest and range headers.

    Raises:
        NotFound: the job has no such artifact.
        ApiError: 416 ``range_not_satisfiable``.
    """
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound("artifact", name)
    url = storage.download_url(artifact.storage_key, artifact.name, PRESIGN_EXPIRES_S)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    etag = etag_of(artifact.sha256)
    headers = {
        "ETag": etag,
        "Repr-Digest": repr_digest(artifact.sha256),
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
    }
    if not_modified(request.headers, etag):
        return Response(status_code=304, headers=headers)
    part = requested_range(request.headers, artifact.size, etag)
    start, length = (0, artifact.size) if part is None else (part.start, part.length)
    status = 200 if part is None else 206
    headers["Content-Length"] = str(length)
    headers["Content-Disposition"] = content_disposition(artifact.name)
    if part is not None:
        headers["Content-Range"] = part.content_range(artifact.size)
    if request.method == "HEAD":  # the headers alone: size, digest, ranges (e.g. curl -I)
        return Response(status_code=status, headers=headers, media_type=artifact.content_type)
    try:
        f = storage.open_read(artifact.storage_key, start)
    except ObjectNotFound:
        raise NotFound("artifact", name) from None
    return StreamingResponse(
        _stream(f, length), status_code=status, media_type=artifact.content_type, headers=headers
    )


@router.get("/{job_id}/artifacts/{name}", response_class=Response, responses=_DOWNLOAD_RESPONSES)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    storage: StorageDep,
) -> Response:
    """Download one output file. ``ETag`` is its quoted sha256 (``If-None-Match`` answers 304);
    ``Range: bytes=START-END`` (one range, ``If-Range`` honoured) answers 206, so an interrupted
    download resumes; a range past the end is 416."""
    job = get_owned(session, Job, job_id, tenant)
    return artifact_response(request, session, storage, job, name)


# HEAD answers what GET would, without the body (artifact_response leaves it out): the same
# endpoint, registered again as its own operation.
router.add_api_route(
    "/{job_id}/artifacts/{name}",
    download_artifact,
    methods=["HEAD"],
    name="artifact_headers",
    response_class=Response,
    responses=_DOWNLOAD_RESPONSES,
    description="The headers a GET of the same file would answer (size, ETag, digest, range), "
    "no body.",
)
