"""Model and dataset uploads through the REST API: streamed, hashed, size-limited, sniffed."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.api.apptools import (
    Service,
    data_bytes,
    model_bytes,
    pickled_model_bytes,
    running_service,
    upload,
)
from tests.zoo import SmallMLP, export_bytes


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path, max_upload_bytes=256 * 1024) as service:
        yield service


def test_upload_model_returns_sha256_size_and_location(svc: Service) -> None:
    headers = svc.key("acme")
    body = model_bytes()
    r = svc.client.post("/v1/models", params={"filename": "mlp.pt"}, content=body, headers=headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["sha256"] == hashlib.sha256(body).hexdigest()
    assert created["size"] == len(body)
    assert created["format"] == "torchscript"
    assert created["filename"] == "mlp.pt"
    assert r.headers["location"] == f"/v1/models/{created['id']}"
    # The stored object is the upload, byte for byte.
    (stored,) = svc.stored_files()
    assert stored.read_bytes() == body

    got = svc.client.get(r.headers["location"], headers=headers)
    assert got.status_code == 200 and got.json() == created
    listed = svc.client.get("/v1/models", headers=headers).json()
    assert [m["id"] for m in listed["items"]] == [created["id"]]


def test_multipart_uploads_store_the_file_part_under_its_name(svc: Service) -> None:
    headers = svc.key("acme")
    body = model_bytes()
    files = {"file": ("mlp.pt", body, "application/octet-stream")}
    r = svc.client.post("/v1/models", files=files, headers=headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["filename"], created["format"]) == ("mlp.pt", "torchscript")
    assert created["sha256"] == hashlib.sha256(body).hexdigest() and created["size"] == len(body)
    (stored,) = svc.stored_files()
    assert stored.read_bytes() == body  # the part's bytes, not the form around them
    data = data_bytes()
    r = svc.client.post(
        "/v1/datasets",
        files={"file": ("calib.npz", data, "application/octet-stream")},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    assert (r.json()["filename"], r.json()["format"]) == ("calib.npz", "npz")


@pytest.mark.parametrize(
    "files",
    [
        {"model": ("mlp.pt", b"x", "application/octet-stream")},
        {"file": ("a.pt", b"x", "application/octet-stream"), "extra": ("b.pt", b"y", "x/y")},
    ],
    ids=["no-file-part", "two-parts"],
)
def test_multipart_upload_without_exactly_one_file_part_is_422(
    svc: Service, files: dict[str, tuple[str, bytes, str]]
) -> None:
    if "extra" in files:  # the first part must pass the sniffer for the second to be read
        files["file"] = ("mlp.pt", model_bytes(), "application/octet-stream")
    r = svc.client.post("/v1/models", files=files, headers=svc.key("acme"))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "named 'file'" in r.json()["error"]["message"]
    assert svc.stored_files() == []


def test_truncated_multipart_upload_is_422_and_stores_nothing(svc: Service) -> None:
    body = model_bytes()
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    # The whole file, but no closing boundary: the upload was cut off.
    r = svc.client.post(
        "/v1/models",
        content=head + body,
        headers={**svc.key("acme"), "content-type": "multipart/form-data; boundary=XyZ"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "malformed multipart body" in r.json()["error"]["message"]
    assert svc.stored_files() == []


def test_unnamed_torch_export_upload_keeps_a_pt2_name(svc: Service) -> None:
    body = export_bytes(SmallMLP(), (torch.randn(2, 16),))
    r = svc.client.post("/v1/models", content=body, headers=svc.key("acme"))
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["filename"]) == ("export", "model.pt2")


def test_upload_dataset_npz(svc: Service) -> None:
    headers = svc.key("acme")
    body = data_bytes()
    created = upload(svc, headers, "datasets", body, "../../etc/calib.npz")
    assert created["format"] == "npz"
    assert created["sha256"] == hashlib.sha256(body).hexdigest()
    assert created["size"] == len(body)
    assert created["filename"] == "calib.npz"  # path components dropped
    got = svc.client.get(f"/v1/datasets/{created['id']}", headers=headers)
    assert got.status_code == 200 and got.json()["sha256"] == created["sha256"]
    assert [d["id"] for d in svc.client.get("/v1/datasets", headers=headers).json()["items"]] == [
        created["id"]
    ]


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    # A generator body: sent chunked, without Content-Length, so the limit is hit while streaming.
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"\0" * n


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_upload_over_limit_is_413_and_stores_nothing(svc: Service, declared: bool) -> None:
    headers = svc.key("acme")
    total = svc.settings.max_upload_bytes + 1
    body = b"\0" * total if declared else _chunks(total)
    r = svc.client.post("/v1/models", params={"filename": "big.pt"}, content=body, headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "upload_too_large"
    assert svc.stored_files() == []
    assert not any(svc.storage._tmp.iterdir())
    assert svc.client.get("/v1/models", headers=headers).json()["items"] == []


def test_pickled_model_is_refused_and_removed(svc: Service) -> None:
    headers = svc.key("acme")
    r = svc.client.post("/v1/models", content=pickled_model_bytes(), headers=headers)
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "model_pickle"
    assert svc.stored_files() == []
    assert svc.client.get("/v1/models", headers=headers).json()["items"] == []


def test_bad_data_files_are_refused_with_their_codes(svc: Service) -> None:
    headers = svc.key("acme")
    buf = io.BytesIO()
    np.savez(buf, input=np.array([{"a": 1}], dtype=object))
    r = svc.client.post("/v1/datasets", content=buf.getvalue(), headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "data_pickle"
    r = svc.client.post("/v1/datasets", content=model_bytes(), headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "data_format"
    r = svc.client.post("/v1/models", content=b"", headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "model_format"
    assert svc.stored_files() == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer mpq_notakey000000000000000000000000"},
        {"Authorization": "Basic x"},
    ],
    ids=["missing", "unknown", "not-bearer"],
)
def test_missing_or_bad_key_is_401(svc: Service, headers: dict[str, str]) -> None:
    r = svc.client.post("/v1/models", content=model_bytes(), headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert svc.stored_files() == []
    r = svc.client.get("/v1/jobs", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
