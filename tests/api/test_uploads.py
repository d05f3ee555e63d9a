"""Streamed uploads (local disk and a real S3 server) and the container sniffers (real archives)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import pickle
import tracemalloc
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as save_safetensors
from torch import nn

from api.sniffing import sniff_data_format, sniff_model_format
from api.upload_stream import HEAD_BYTES, UploadResult, UploadTooLarge, receive_upload
from mpq_core.data import load_data
from mpq_core.errors import DataError, ModelFormatError
from mpq_core.intake import detect_format
from mpq_service.storage import LocalStorage, S3Storage, Storage
from tests.support.files import npz_bytes
from tests.support.s3server import S3Server
from tests.zoo import SmallMLP, export_bytes, torchscript_bytes

MiB = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def module_s3_storage(s3_server: S3Server) -> S3Storage:
    storage = S3Storage(
        bucket=f"mpq-uploads-{uuid.uuid4().hex[:8]}",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        part_size=5 * MiB,
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    return request.getfixturevalue("module_s3_storage")


def new_key() -> str:
    return f"uploads/{uuid.uuid4().hex}/model.pt"


class Body:
    """An async request body of ``total`` bytes in ``chunk``-byte pieces that counts how much
    was consumed; the same chunk object is reused so the source itself allocates nothing."""

    def __init__(self, total: int, chunk: int = CHUNK, delay: float = 0.0) -> None:
        self.total = total
        self.chunk = chunk
        self.delay = delay
        self.consumed = 0
        self._piece = bytes(range(256)) * (chunk // 256) + bytes(chunk % 256)

    def expected(self) -> bytes:
        full, rest = divmod(self.total, self.chunk)
        return self._piece * full + self._piece[:rest]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.consumed < self.total:
            n = min(self.chunk, self.total - self.consumed)
            self.consumed += n
            if self.delay:
                await asyncio.sleep(self.delay)
            yield self._piece if n == self.chunk else self._piece[:n]


def upload(body: Body, storage: Storage, key: str, max_bytes: int) -> UploadResult:
    return asyncio.run(receive_upload(body.__aiter__(), storage, key, max_bytes))


def no_leftovers(storage: Storage, key: str) -> None:
    assert not storage.exists(key)
    if isinstance(storage, LocalStorage):
        files = [p for p in storage.root.rglob("*") if p.is_file()]
        assert files == [], files
    else:
        assert isinstance(storage, S3Storage)
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads")
        assert not uploads, uploads


def test_upload_hashes_and_stores(storage: Storage) -> None:
    body = Body(7 * MiB + 123, chunk=50_000)  # odd chunks; two S3 parts
    key = new_key()
    result = upload(body, storage, key, max_bytes=100 * MiB)
    data = body.expected()
    assert result.size == len(data) == storage.size(key)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.head == data[:HEAD_BYTES]
    assert storage.read_bytes(key) == data


def test_concurrent_uploads(storage: Storage) -> None:
    bodies = [Body(2 * MiB + i * 1000, chunk=32_768, delay=0.0005) for i in range(12)]
    keys = [new_key() for _ in bodies]

    async def main() -> list[UploadResult]:
        return await asyncio.gather(
            *(
                receive_upload(b.__aiter__(), storage, k, 10 * MiB)
                for b, k in zip(bodies, keys, strict=True)
            )
        )

    results = asyncio.run(main())
    for body, key, result in zip(bodies, keys, results, strict=True):
        data = body.expected()
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        assert storage.read_bytes(key) == data


def test_upload_exactly_at_the_limit_passes(storage: Storage) -> None:
    body = Body(3 * CHUNK)
    result = upload(body, storage, new_key(), max_bytes=3 * CHUNK)
    assert result.size == 3 * CHUNK


def test_empty_and_tiny_uploads(storage: Storage) -> None:
    key = new_key()
    result = upload(Body(0), storage, key, max_bytes=10)
    assert (result.size, result.head) == (0, b"")
    assert result.sha256 == hashlib.sha256(b"").hexdigest()
    assert storage.read_bytes(key) == b""
    result = upload(Body(5), storage, key, max_bytes=10)
    assert result.head == storage.read_bytes(key) == bytes(range(5))


def test_limit_enforced_mid_stream_without_buffering(storage: Storage) -> None:
    limit = 1 * MiB
    body = Body(50 * MiB)
    key = new_key()
    tracemalloc.start()
    try:
        with pytest.raises(UploadTooLarge) as err:
            upload(body, storage, key, max_bytes=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.limit == limit
    assert err.value.code == "upload_too_large"
    assert "1048576 bytes" in err.value.message
    assert body.consumed <= limit + CHUNK  # stopped at the chunk that crossed the limit
    assert peak < 8 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    no_leftovers(storage, key)


def test_large_upload_streams_in_bounded_memory(storage: Storage) -> None:
    body = Body(48 * MiB)
    key = new_key()
    tracemalloc.start()
    try:
        result = upload(body, storage, key, max_bytes=64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == 48 * MiB
    assert result.sha256 == hashlib.sha256(body.expected()).hexdigest()
    # Local: the queue (4 x 1 MiB) and the batch being built; S3: plus one 5 MiB part in flight.
    bound = 10 * MiB if isinstance(storage, LocalStorage) else 16 * MiB
    assert peak < bound, f"peak traced memory {peak / MiB:.1f} MiB for a 48 MiB upload"
    assert storage.size(key) == 48 * MiB


def test_too_large_leaves_an_existing_object_alone(storage: Storage) -> None:
    key = new_key()
    upload(Body(1000), storage, key, max_bytes=MiB)
    with pytest.raises(UploadTooLarge):
        upload(Body(20 * MiB), storage, key, max_bytes=12 * MiB)  # after two S3 parts
    assert storage.size(key) == 1000
    storage.delete(key)
    no_leftovers(storage, key)


class Disconnect(Exception):
    pass


def test_client_disconnect_leaves_nothing(storage: Storage) -> None:
    async def broken() -> AsyncIterator[bytes]:
        for _ in range(200):  # 12.5 MiB, then the connection drops
            yield bytes(CHUNK)
        raise Disconnect

    key = new_key()
    with pytest.raises(Disconnect):
        asyncio.run(receive_upload(broken(), storage, key, 100 * MiB))
    no_leftovers(storage, key)


def test_cancelled_upload_leaves_nothing(storage: Storage) -> None:
    body = Body(100 * MiB, delay=0.001)
    key = new_key()

    async def main() -> None:
        task = asyncio.create_task(receive_upload(body.__aiter__(), storage, key, 200 * MiB))
        while body.consumed < 7 * MiB:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert body.consumed < 100 * MiB
    no_leftovers(storage, key)


def test_storage_failure_surfaces_without_hanging(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    storage = LocalStorage(blocker / "objects")  # every write fails
    body = Body(30 * MiB)

    async def main() -> None:
        await asyncio.wait_for(receive_upload(body.__aiter__(), storage, new_key(), 100 * MiB), 20)

    with pytest.raises(OSError):
        asyncio.run(main())
    assert body.consumed < 30 * MiB  # gave up early instead of draining the client


def test_storage_failure_on_s3_surfaces(s3_server: S3Server) -> None:
    storage = S3Storage(
        bucket="mpq-no-such-bucket",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        part_size=5 * MiB,
    )
    body = Body(30 * MiB)

    async def main() -> None:
        await asyncio.wait_for(receive_upload(body.__aiter__(), storage, new_key(), 100 * MiB), 30)

    with pytest.raises(Exception, match=r"NoSuchBucket|does not exist|404"):
        asyncio.run(main())


# --- sniffers on real archives --------------------------------------------------------------


class Wide(nn.Module):
    """Large enough that the first 4 KiB show only the first tensor's entry."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _torch_save(obj: object, **kw: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def _models() -> dict[str, Callable[[], bytes]]:
    mlp = SmallMLP().eval()
    wide = Wide().eval()
    x16 = (torch.randn(2, 16),)
    x64 = (torch.randn(2, 64),)
    return {
        "script": lambda: torchscript_bytes(mlp, x16),
        "trace": lambda: torchscript_bytes(mlp, x16, trace=True),
        "script_wide": lambda: torchscript_bytes(wide, x64),
        "export": lambda: export_bytes(mlp, x16),
        "export_fixed": lambda: export_bytes(mlp, x16, dynamic_batch=False),
        "export_wide": lambda: export_bytes(wide, x64),
        "save_module": lambda: _torch_save(mlp),
        "save_state_dict": lambda: _torch_save(mlp.state_dict()),
        "save_wide_module": lambda: _torch_save(wide),
        "save_legacy": lambda: _torch_save(mlp.state_dict(), _use_new_zipfile_serialization=False),
    }


MODELS = _models()
EXPECTED_MODEL = {
    "script": "torchscript",
    "trace": "torchscript",
    "script_wide": "torchscript",
    "export": "export",
    "export_fixed": "export",
    "export_wide": "export",
    "save_module": "model_pickle",
    "save_state_dict": "model_pickle",
    "save_wide_module": "model_pickle",
    "save_legacy": "model_pickle",
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sniff_model_format_agrees_with_intake(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = MODELS[name]()
    head = data[:HEAD_BYTES]
    expected = EXPECTED_MODEL[name]
    if expected in ("torchscript", "export"):
        assert sniff_model_format(head) == expected
        assert detect_format(data) == expected  # the worker's full check agrees
    else:
        with pytest.raises(ModelFormatError) as err:
            sniff_model_format(head)
        assert err.value.code == expected
        with pytest.raises(ModelFormatError) as full:
            detect_format(data)
        assert full.value.code == expected


def test_sniff_model_format_wide_archives_show_one_entry() -> None:
    """The 'wide' cases really exercise sniffing from a head that holds only the first entry."""
    from api.sniffing import _zip_entries

    for name in ("script_wide", "export_wide"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = MODELS[name]()[:HEAD_BYTES]
        assert len(_zip_entries(head)) == 1, name


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: b"", "model_format"),
        (lambda: b"hello world, not a model" * 10, "model_format"),
        (lambda: b"PK\x03\x04" + b"\xff" * 40, "model_format"),
        (lambda: npz_bytes(input=np.zeros((4, 16), np.float32)), "model_format"),
        (lambda: pickle.dumps({"weights": [1, 2, 3]}), "model_pickle"),
        (lambda: save_safetensors({"w": np.zeros(3, np.float32)}), "model_format"),
    ],
)
def test_sniff_model_format_refuses(make: Callable[[], bytes], code: str) -> None:
    with pytest.raises(ModelFormatError) as err:
        sniff_model_format(make()[:HEAD_BYTES])
    assert err.value.code == code
    assert err.value.message


def test_sniff_model_refusal_says_how_to_fix() -> None:
    with pytest.raises(ModelFormatError) as err:
        sniff_model_format(MODELS["save_module"]()[:HEAD_BYTES])
    assert "torch.jit.save" in err.value.message and "torch.export.save" in err.value.message
    with pytest.raises(ModelFormatError) as err:
        sniff_model_format(npz_bytes(input=np.zeros(3, np.float32)))
    assert "dataset" in err.value.message


X = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
Y = np.arange(64, dtype=np.int64) % 5


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: npz_bytes(input=X, labels=Y), "npz"),
        (lambda: npz_bytes(input_0=X, input_1=X), "npz"),
        (lambda: npz_bytes(compressed=True, input=X, labels=Y), "npz"),
        (lambda: save_safetensors({"input": X, "labels": Y}), "safetensors"),
        (lambda: save_safetensors({"input": np.zeros((4096, 8), np.float32)}), "safetensors"),
    ],
)
def test_sniff_data_format_accepts(make: Callable[[], bytes], expected: str) -> None:
    data = make()
    assert sniff_data_format(data[:HEAD_BYTES], size=len(data)) == expected
    assert sniff_data_format(data[:HEAD_BYTES]) == expected
    assert load_data(data).num_samples > 0  # the worker's full check agrees


def _object_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, input=np.array([{"a": 1}, None], dtype=object))
    return buf.getvalue()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, X)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: b"", "data_format", "empty"),
        (_object_npz, "data_pickle", "pickle"),
        (_npy, "data_format", "single .npy"),
        (lambda: MODELS["script"](), "data_format", "model archive"),
        (lambda: MODELS["export"](), "data_format", "model archive"),
        (lambda: _torch_save({"input": torch.zeros(3)}), "data_format", ".npz"),
        (lambda: pickle.dumps({"input": [1.0]}), "data_format", "never unpickles"),
        (lambda: b"input,labels\n0.1,1\n", "data_format", ".safetensors"),
    ],
)
def test_sniff_data_format_refuses(make: Callable[[], bytes], code: str, words: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = make()
    with pytest.raises(DataError) as err:
        sniff_data_format(data[:HEAD_BYTES], size=len(data))
    assert err.value.code == code
    assert words in err.value.message


def test_sniff_safetensors_header_longer_than_the_file() -> None:
    data = save_safetensors({"input": X})
    with pytest.raises(DataError):
        sniff_data_format(data[:HEAD_BYTES], size=20)


def test_sniff_the_head_of_an_actual_upload(tmp_path: Path) -> None:
    data = MODELS["export_wide"]()
    storage = LocalStorage(tmp_path / "objects")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    result = asyncio.run(receive_upload(chunks(), storage, "m/model.pt2", len(data)))
    assert len(result.head) == HEAD_BYTES
    assert sniff_model_format(result.head) == "export"
    assert storage.read_bytes("m/model.pt2") == data
