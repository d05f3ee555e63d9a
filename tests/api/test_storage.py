"""The storage behaviour suite, run on local disk and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from mpq_service.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    content_disposition,
    make_storage,
    validate_key,
)
from tests.support.s3server import S3Server

MiB = 1024 * 1024


def s3_storage(server: S3Server, bucket: str) -> S3Storage:
    storage = S3Storage(
        bucket=bucket,
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
        part_size=5 * MiB,  # the S3 minimum: multi-MB tests use several parts
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture(scope="module")
def module_s3_storage(s3_server: S3Server) -> S3Storage:
    """One bucket (and one client: building a boto3 client takes ~0.2 s) per module."""
    return s3_storage(s3_server, f"mpq-storage-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        local = LocalStorage(tmp_path / "objects")
        local.ensure_ready()
        return local
    return request.getfixturevalue("module_s3_storage")


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix: S3 tests share one bucket."""
    return f"t{uuid.uuid4().hex[:12]}"


def chunks(total: int, size: int, seed: int = 0) -> Iterator[bytes]:
    """``total`` pseudo-random bytes in chunks of ``size`` (the last may be shorter)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    sent = 0
    i = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([i % 251]) + block[1:n]
        sent += n
        i += 1


def body(total: int, size: int, seed: int = 0) -> bytes:
    return b"".join(chunks(total, size, seed))


def no_multipart_left(storage: Storage) -> bool:
    if not isinstance(storage, S3Storage):
        return True
    resp = storage.client.list_multipart_uploads(Bucket=storage.bucket)
    return not resp.get("Uploads")


def test_stream_round_trip_multi_mb(storage: Storage, prefix: str, tmp_path: Path) -> None:
    key = f"{prefix}/models/m1/model.pt"
    total = 12 * MiB + 12345  # three 5 MiB S3 parts, the last one short
    expected = body(total, 300_000)
    assert storage.put_stream(key, chunks(total, 300_000)) == total
    assert storage.exists(key)
    assert storage.size(key) == total
    with storage.open_read(key) as f:
        assert f.read(10) == expected[:10]
        assert f.read() == expected[10:]
    offset = 5 * MiB + 7  # a ranged download's start, inside the second S3 part
    with storage.open_read(key, offset) as f:
        assert f.read() == expected[offset:]
    parts = list(storage.iter_chunks(key, chunk=MiB))
    assert all(0 < len(p) <= MiB for p in parts)
    assert b"".join(parts) == expected
    dest = tmp_path / "worker" / "model.pt"
    assert storage.get_file(key, dest) == total
    assert dest.read_bytes() == expected
    assert [p.name for p in dest.parent.iterdir()] == ["model.pt"]  # no temp file left
    assert no_multipart_left(storage)


def test_put_stream_takes_a_file_object_and_put_file(
    storage: Storage, prefix: str, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    data = body(6 * MiB + 7, 65536, seed=3)
    src.write_bytes(data)
    with open(src, "rb") as f:
        assert storage.put_stream(f"{prefix}/a", f) == len(data)
    assert storage.put_file(f"{prefix}/b", src) == len(data)
    assert storage.read_bytes(f"{prefix}/a") == data
    assert storage.read_bytes(f"{prefix}/b") == data


def test_small_and_empty_objects(storage: Storage, prefix: str) -> None:
    assert storage.put_bytes(f"{prefix}/doc.json", b'{"a": 1}') == 8
    assert storage.read_bytes(f"{prefix}/doc.json") == b'{"a": 1}'
    assert storage.put_stream(f"{prefix}/empty", iter([])) == 0
    assert storage.exists(f"{prefix}/empty")
    assert storage.size(f"{prefix}/empty") == 0
    assert storage.read_bytes(f"{prefix}/empty") == b""
    assert list(storage.iter_chunks(f"{prefix}/empty")) == []


def test_overwrite_replaces(storage: Storage, prefix: str) -> None:
    key = f"{prefix}/x"
    storage.put_bytes(key, b"first version")
    storage.put_bytes(key, b"second")
    assert storage.read_bytes(key) == b"second"
    assert storage.size(key) == 6


def test_exists_delete_and_missing(storage: Storage, prefix: str, tmp_path: Path) -> None:
    key = f"{prefix}/d/obj"
    assert not storage.exists(key)
    storage.put_bytes(key, b"hello")
    assert storage.exists(key)
    assert not storage.exists(f"{prefix}/d")  # a "directory" is not an object
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # idempotent
    with pytest.raises(ObjectNotFound):
        storage.size(key)
    with pytest.raises(ObjectNotFound):
        storage.open_read(key)
    with pytest.raises(ObjectNotFound):
        list(storage.iter_chunks(key))
    with pytest.raises(FileNotFoundError):  # ObjectNotFound is a FileNotFoundError
        storage.read_bytes(key)
    dest = tmp_path / "dl" / "out.bin"
    with pytest.raises(ObjectNotFound):
        storage.get_file(key, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


class Boom(RuntimeError):
    pass


def failing(total: int, fail_after: int) -> Iterator[bytes]:
    for i, chunk in enumerate(chunks(total, MiB)):
        if i == fail_after:
            raise Boom("client went away")
        yield chunk


def test_failed_stream_leaves_nothing_and_keeps_old_object(storage: Storage, prefix: str) -> None:
    new = f"{prefix}/new"
    with pytest.raises(Boom):
        storage.put_stream(new, failing(20 * MiB, fail_after=12))  # after two S3 parts
    assert not storage.exists(new)
    old = f"{prefix}/old"
    storage.put_bytes(old, b"old content")
    with pytest.raises(Boom):
        storage.put_stream(old, failing(20 * MiB, fail_after=7))
    assert storage.read_bytes(old) == b"old content"
    assert no_multipart_left(storage)
    if isinstance(storage, LocalStorage):
        assert list((storage.root / ".tmp").iterdir()) == []


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../escape",
    "a/../../escape",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\escape",
    "C:/windows",
    "a\x00b",
    "a\nb",
    ".tmp/x",
    "k" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(storage: Storage, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")
    for op in (storage.exists, storage.size, storage.open_read, storage.delete):
        with pytest.raises(ValueError):
            op(key)
    with pytest.raises(ValueError):
        storage.download_url(key, "f.bin")
    if isinstance(storage, LocalStorage):  # nothing written beside (or in) the local root
        assert sorted(p.name for p in tmp_path.iterdir()) == ["objects"]
        assert [p.name for p in storage.root.iterdir()] == [".tmp"]


def test_local_path_traversal_never_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    storage = LocalStorage(root)
    (tmp_path / "secret").write_bytes(b"do not read")
    for key in ("../secret", "x/../../secret", str(tmp_path / "secret"), "..\\secret"):
        with pytest.raises(ValueError):
            storage.open_read(key)
    # A symlink inside the root pointing outside it is refused as well.
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError):
        storage.open_read("link/secret")
    assert storage.put_bytes("ok/name.bin", b"fine") == 4
    assert (root / "ok" / "name.bin").read_bytes() == b"fine"
    assert storage.path("ok/name.bin") == root.resolve() / "ok" / "name.bin"


def test_download_url(storage: Storage, prefix: str) -> None:
    key = f"{prefix}/artifacts/model.pt"
    data = body(3 * MiB + 5, 100_000, seed=9)
    storage.put_stream(key, iter([data]))
    url = storage.download_url(key, "quantized model é.pt", expires_s=120)
    if isinstance(storage, LocalStorage):
        assert url is None  # the API streams local files itself
        return
    assert isinstance(storage, S3Storage)
    assert url is not None
    assert url.startswith(f"{storage.endpoint_url}/{storage.bucket}/")
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.read() == data
        disposition = resp.headers["Content-Disposition"]
    assert disposition == content_disposition("quantized model é.pt")
    assert 'filename="quantized model e.pt"' in disposition
    assert "filename*=UTF-8''quantized%20model%20%C3%A9.pt" in disposition
    # The signature covers the parameters: tampering with the filename is refused.
    tampered = url.replace("model%20", "evil%20", 1)
    assert tampered != url
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=30)
    assert err.value.code == 403


def test_content_disposition() -> None:
    assert content_disposition("model.pt") == 'attachment; filename="model.pt"'
    value = content_disposition('we"ird\\name\n.pt')
    assert value.startswith('attachment; filename="we_ird_name_.pt"; filename*=UTF-8')
    assert content_disposition("../../etc/passwd").startswith('attachment; filename=".._.._etc')


def test_ensure_bucket_is_idempotent(s3_server: S3Server) -> None:
    bucket = f"mpq-new-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert bucket not in names
    storage = s3_storage(s3_server, bucket)
    storage.ensure_bucket()
    storage.ensure_ready()
    assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}
    storage.put_bytes("k", b"v")
    assert storage.read_bytes("k") == b"v"


def test_wrong_credentials_are_refused(s3_server: S3Server) -> None:
    storage = S3Storage(
        bucket="mpq-any-bucket",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|403|InvalidAccessKey"):
        storage.ensure_bucket()


def settings(**kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "storage": "local",
        "data_dir": Path("."),
        "s3_endpoint_url": None,
        "s3_bucket": None,
        "s3_access_key": None,
        "s3_secret_key": None,
        "s3_region": "us-east-1",
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_make_storage_local(tmp_path: Path) -> None:
    storage = make_storage(settings(data_dir=tmp_path))
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "objects").resolve()
    assert not storage.root.exists()  # no I/O until ensure_ready / the first write
    storage.put_bytes("a/b", b"x")
    assert (tmp_path / "objects" / "a" / "b").read_bytes() == b"x"


def test_make_storage_s3(s3_server: S3Server) -> None:
    bucket = f"mpq-made-{uuid.uuid4().hex[:8]}"
    storage = make_storage(
        settings(
            storage="s3",
            s3_endpoint_url=s3_server.endpoint_url,
            s3_bucket=bucket,
            s3_access_key=s3_server.access_key,
            s3_secret_key=SecretStr(s3_server.secret_key),
            s3_region=s3_server.region,
        )
    )
    assert isinstance(storage, S3Storage)
    storage.ensure_ready()
    storage.put_bytes("a/b", b"via settings")
    assert storage.read_bytes("a/b") == b"via settings"


def test_make_storage_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown storage"):
        make_storage(settings(storage="ftp"))
    with pytest.raises(ValueError, match="bucket"):
        make_storage(settings(storage="s3"))


def test_presigned_url_for_public_endpoint(s3_server: S3Server) -> None:
    storage = S3Storage(
        bucket="mpq-public",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        public_endpoint_url="http://files.example.test:8333",
    )
    url = storage.download_url("k/model.pt", "model.pt", 60)
    assert url is not None and url.startswith(
        "http://files.example.test:8333/mpq-public/k/model.pt?"
    )


def test_s3_server_listens_on_loopback_only(s3_server: S3Server) -> None:
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    pid = s3_server.proc.pid
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                listening.append(fields[1])
    assert listening, "weed listens on nothing?"
    for local in listening:
        addr = local.split(":")[0]
        assert addr == "0100007F", f"weed listens on a non-loopback address: {local}"
