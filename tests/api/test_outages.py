"""Outages and vanishing clients against a real ``mpq serve``: a Postgres made unreachable (a TCP
proxy in front of it, stopped), a SeaweedFS S3 server killed, a flaky network in front of S3, and
clients that go away mid-upload or mid-download.

What must hold: an outage is a 503 with a stable code (``database_unavailable``,
``storage_unavailable``) and ``Retry-After``, never a 500; ``/healthz`` keeps answering; the
service recovers when the dependency does; nothing is left in storage (no object, no
in-progress S3 multipart upload); nothing is logged as an unhandled error.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mpq_service.db import make_engine, make_sessionmaker, session_scope
from mpq_service.storage import S3Storage, StorageUnavailable
from mpq_service.tables import Artifact, Job, Tenant
from tests.api.apptools import SPEC, data_bytes, model_bytes
from tests.api.served import (
    Served,
    open_upload,
    read_response,
    served,
    stored_objects,
)
from tests.support.s3server import S3Server, start_s3_server
from tests.support.tcp_proxy import TcpProxy

MiB = 1024 * 1024


def _assert_outage(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["Retry-After"]) > 0


# --- the database ----------------------------------------------------------------------------


def test_database_outage_is_503_and_the_service_recovers(
    served_on_proxied_pg: tuple[TcpProxy, Served],
) -> None:
    proxy, api = served_on_proxied_pg
    with api.client() as client:
        assert client.get("/v1/jobs").status_code == 200
        proxy.cut()  # Postgres is gone: connections reset, new ones refused
        _assert_outage(client.get("/v1/jobs"), "database_unavailable")
        r = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
        _assert_outage(r, "database_unavailable")
        r = client.post("/v1/jobs", json={"model_id": "x", "dataset_id": "y", "spec": SPEC})
        _assert_outage(r, "database_unavailable")
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 503
        proxy.restore()  # back
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/jobs").status_code == 200
        r = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
        assert r.status_code == 201, r.text
    assert len(stored_objects(api.data_dir)) == 1  # only the upload made after the outage
    api.stop_and_check_log()


def test_database_lost_mid_upload_is_503_and_leaves_nothing(
    served_on_proxied_pg: tuple[TcpProxy, Served],
) -> None:
    proxy, api = served_on_proxied_pg
    body = model_bytes()
    sock = open_upload(api, "/v1/models?filename=m.pt", len(body))  # authenticated
    try:
        proxy.cut()  # the database goes while the body streams
        sock.sendall(body)
        status, answer = read_response(sock)
    finally:
        sock.close()
    assert status == 503, answer
    assert b'"database_unavailable"' in answer
    assert stored_objects(api.data_dir) == []  # the stored file was deleted again
    api.stop_and_check_log()


# --- the object storage ----------------------------------------------------------------------


def _s3_settings(server: S3Server, bucket: str, **more: str) -> dict[str, str]:
    return {
        "storage": "s3",
        "s3_endpoint_url": server.endpoint_url,
        "s3_bucket": bucket,
        "s3_access_key": server.access_key,
        "s3_secret_key": server.secret_key,
        "s3_region": server.region,
        **more,
    }


def test_storage_outage_is_503_and_reads_go_on(tmp_path: Path) -> None:
    own = start_s3_server()  # killed below: not the suite's shared server
    try:
        settings = _s3_settings(own, "mpq-outage", s3_max_attempts="2")
        with served(tmp_path, **settings) as api, api.client() as client:
            r = client.post("/v1/models", params={"filename": "m.pt"}, content=model_bytes())
            assert r.status_code == 201, r.text
            own.stop()  # SeaweedFS is gone
            r = client.post("/v1/models", params={"filename": "n.pt"}, content=model_bytes())
            _assert_outage(r, "storage_unavailable")
            r = client.post("/v1/datasets", params={"filename": "d.npz"}, content=data_bytes())
            _assert_outage(r, "storage_unavailable")
            models = client.get("/v1/models").json()["items"]  # the database still answers
            assert [m["filename"] for m in models] == ["m.pt"]  # no row for a file not stored
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503
            api.stop_and_check_log()
    finally:
        own.stop()


def _multipart_uploads(server: S3Server, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = (
        server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )
    return uploads


def _objects(server: S3Server, bucket: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def _padded_model(total: int) -> Iterator[bytes]:
    """A real TorchScript archive's bytes, then zeros up to ``total`` bytes, in 1 MiB chunks."""
    head = model_bytes()
    yield head
    sent = len(head)
    while sent < total:
        n = min(MiB, total - sent)
        yield bytes(n)
        sent += n


def test_s3_multipart_upload_over_the_limit_is_aborted_on_the_server(
    tmp_path: Path, s3_server: S3Server
) -> None:
    bucket = f"mpq-limit-{uuid.uuid4().hex[:8]}"
    settings = _s3_settings(s3_server, bucket, max_upload_bytes=str(20 * MiB))
    with served(tmp_path, **settings) as api, api.client() as client:
        # Chunked (no Content-Length): refused only once 20 MiB arrived, 2 parts in.
        r = client.post(
            "/v1/models", params={"filename": "big.pt"}, content=_padded_model(40 * MiB)
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
        assert _multipart_uploads(s3_server, bucket) == []
        assert _objects(s3_server, bucket) == []
        api.stop_and_check_log()


def test_s3_multipart_upload_of_a_vanished_client_is_aborted_on_the_server(
    tmp_path: Path, s3_server: S3Server
) -> None:
    bucket = f"mpq-gone-{uuid.uuid4().hex[:8]}"
    with served(tmp_path, **_s3_settings(s3_server, bucket)) as api:
        sock = open_upload(api, "/v1/models?filename=big.pt", 30 * MiB)
        try:
            for chunk in _padded_model(12 * MiB):  # one 8 MiB part goes to S3
                sock.sendall(chunk)
            deadline = time.monotonic() + 60
            while not _multipart_uploads(s3_server, bucket):  # the upload is in progress
                assert time.monotonic() < deadline, "no multipart upload was started"
                time.sleep(0.1)
        finally:
            sock.close()  # the client vanishes mid-body
        api.wait_for_log("client disconnected during POST /v1/models")
        assert _multipart_uploads(s3_server, bucket) == []
        assert _objects(s3_server, bucket) == []
        api.stop_and_check_log()


def _flaky_storage(server: S3Server, proxy: TcpProxy, bucket: str, attempts: int) -> S3Storage:
    return S3Storage(
        bucket=bucket,
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
        max_attempts=attempts,
    )


def test_s3_requests_are_retried_through_a_flaky_network(s3_server: S3Server) -> None:
    host, port = s3_server.endpoint_url.removeprefix("http://").split(":")
    bucket = f"mpq-flaky-{uuid.uuid4().hex[:8]}"
    with TcpProxy(host, int(port)) as proxy:
        _flaky_storage(s3_server, proxy, bucket, attempts=1).ensure_bucket()
        storage = _flaky_storage(s3_server, proxy, bucket, attempts=4)  # no connection yet
        proxy.drop_next = 3  # the next three connections are reset at once
        storage.put_bytes("k", b"payload")
        assert proxy.dropped == 3
        assert storage.read_bytes("k") == b"payload"

        proxy.drop_next = 100  # longer than the retries last
        with pytest.raises(StorageUnavailable, match="cannot store 'k2'"):
            _flaky_storage(s3_server, proxy, bucket, attempts=2).put_bytes("k2", b"x")
        assert proxy.dropped == 3 + 2  # tried twice, as configured
        proxy.drop_next = 0
        assert not storage.exists("k2")


# --- clients that go away --------------------------------------------------------------------


def _artifact(api: Served, database_url: str, size: int) -> str:
    """A finished job of the key's tenant with one ``size``-byte artifact ``big.bin`` stored
    in local storage; the job id."""
    with api.client() as client:
        model = client.post("/v1/models", content=model_bytes()).json()["id"]
        data = client.post("/v1/datasets", content=data_bytes()).json()["id"]
    engine = make_engine(database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            tenant = session.scalars(select(Tenant.id).where(Tenant.name == "acme")).one()
            job = Job(tenant_id=tenant, model_id=model, dataset_id=data, spec=SPEC,
                      status="succeeded")  # fmt: skip
            session.add(job)
            session.flush()
            key = f"tenants/{tenant}/jobs/{job.id}/big.bin"
            path = api.data_dir / "objects" / key
            path.parent.mkdir(parents=True)
            path.write_bytes(bytes(size))
            session.add(Artifact(job_id=job.id, tenant_id=tenant, name="big.bin", size=size,
                                 sha256="0" * 64, storage_key=key))  # fmt: skip
            return job.id
    finally:
        engine.dispose()


def _vanish_mid_form(api: Served) -> None:
    """A multipart ``POST /v1/jobs`` whose client goes away inside its model part."""
    boundary = "mpqboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sock = open_upload(
        api, "/v1/jobs", 10 * MiB, content_type=f"multipart/form-data; boundary={boundary}"
    )
    with sock:
        sock.sendall(head + model_bytes() + bytes(2 * MiB))
    api.wait_for_log("client disconnected during POST /v1/jobs")


def test_clients_vanishing_mid_request_are_not_errors(tmp_path: Path) -> None:
    with served(tmp_path) as api:
        _vanish_mid_form(api)
        assert stored_objects(api.data_dir) == []  # the form's model part was deleted again
        job_id = _artifact(api, f"sqlite:///{api.data_dir / 'mpq.db'}", 64 * MiB)
        request = (
            f"GET /v1/jobs/{job_id}/artifacts/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {api.key}\r\n\r\n"
        ).encode()
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
                sock.sendall(request)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with api.client() as client:  # the server is still fine
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        api.stop_and_check_log()
