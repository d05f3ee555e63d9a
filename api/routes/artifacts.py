"""``/v1/jobs/{id}/artifacts``: a job's output files, listed and downloaded (streamed by the
API, or a 307 to a presigned storage URL when the backend has one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select

from api.deps import CurrentTenant, SessionDep, StorageDep
from api.errors import NotFound
from api.ownership import get_owned
from api.routing import SessionReleasingRoute
from api.schemas import ArtifactList, ArtifactPublic
from mpq_service.storage import DEFAULT_CHUNK, ObjectNotFound, content_disposition
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


def _stream(f: BinaryIO) -> Iterator[bytes]:
    try:
        while data := f.read(DEFAULT_CHUNK):
            yield data
    finally:
        f.close()


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        307: {"description": "download it from the presigned URL in Location"},
    },
)
def download_artifact(
    job_id: str, name: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep
) -> Response:
    """Download one output file."""
    job = get_owned(session, Job, job_id, tenant)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)
    )
    if artifact is None:
        raise NotFound("artifact", name)
    url = storage.download_url(artifact.storage_key, artifact.name, PRESIGN_EXPIRES_S)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    try:
        f = storage.open_read(artifact.storage_key)
    except ObjectNotFound:
        raise NotFound("artifact", name) from None
    return StreamingResponse(
        _stream(f),
        media_type=artifact.content_type,
        headers={
            "Content-Length": str(artifact.size),
            "Content-Disposition": content_disposition(artifact.name),
        },
    )
