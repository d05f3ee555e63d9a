"""The Python client (``client/mpq_client``) against a real ``mpq serve`` with its embedded
worker: one service for the whole module (SQLite, local storage, the filesystem broker), real
jobs on the tiny MLP of tests/zoo.py.

Uploads streamed from a path, an open file and bytes; a job submitted, waited for and its
artefacts downloaded byte for byte as the API serves them; job lists across pages; the API's
error codes as exceptions; a failed job as :class:`JobFailed`; cancel and delete; progress
lines on a stderr that is not a terminal; and a download redirected to another host, which
never receives the API key.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mpq_client import (
    Client,
    Conflict,
    Dataset,
    DownloadCorrupt,
    InvalidRequest,
    Job,
    JobCancelled,
    JobFailed,
    Model,
    NotFound,
    ProgressPrinter,
    Unauthorized,
    WaitTimeout,
)
from tests.api.served import Served, served
from tests.client.presigning import presigning
from tests.support.files import npz_bytes
from tests.worker.conftest import SPEC, mlp_npz

JOB_TIMEOUT_S = 300.0
MAX_UPLOAD_BYTES = 1_000_000  # the service's limit, to show a streamed upload refused past it
OUTPUTS = {"model.pt", "model.mpq.safetensors", "report.json", "allocation.json"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("client")
    with served(folder, worker=True, max_upload_bytes=str(MAX_UPLOAD_BYTES)) as running:
        yield running
        running.stop_and_check_log()  # nothing the client sent was answered with a 500


@pytest.fixture
def client(service: Served) -> Iterator[Client]:
    with Client(service.base_url, service.key, timeout=30) as mpq:
        yield mpq


@dataclass(frozen=True)
class Uploaded:
    model: Model
    model_bytes: bytes
    calib: Dataset
    calib_bytes: bytes
    test: Dataset


@pytest.fixture(scope="module")
def uploaded(
    service: Served,
    zoo_bytes: Callable[[str, str], bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> Uploaded:
    """The MLP uploaded from a path, its calibration data from an open file, test data as
    bytes."""
    folder = tmp_path_factory.mktemp("uploads")
    model_path, calib_path = folder / "mlp.pt", folder / "calib.npz"
    model_path.write_bytes(zoo_bytes("mlp", "script"))
    calib_path.write_bytes(mlp_npz())
    with Client(service.base_url, service.key) as mpq:
        model = mpq.upload_model(model_path)
        with calib_path.open("rb") as f:
            calib = mpq.upload_dataset(f)
        test = mpq.upload_dataset(mlp_npz(32), filename="test.npz")
    return Uploaded(model, model_path.read_bytes(), calib, calib_path.read_bytes(), test)


@dataclass(frozen=True)
class Finished:
    job: Job
    progress: str  # what the progress printer wrote (to a stream that is not a terminal)


@pytest.fixture(scope="module")
def finished(service: Served, uploaded: Uploaded) -> Finished:
    """A job submitted on the uploads and waited for until it succeeded."""
    out = io.StringIO()
    with Client(service.base_url, service.key) as mpq:
        job = mpq.submit(uploaded.model, uploaded.calib, SPEC, eval_dataset=uploaded.test.id)
        done = mpq.wait(job, timeout=JOB_TIMEOUT_S, progress=ProgressPrinter(out))
    return Finished(done, out.getvalue())


def _submit_and_cancel(mpq: Client, uploaded: Uploaded) -> Job:
    """A job cancelled right after it was queued (the worker never runs it to the end)."""
    job = mpq.submit(uploaded.model.id, uploaded.calib, SPEC, finetune={"epochs": 50})
    cancelled = mpq.cancel(job)
    assert cancelled.status == "cancelled" and cancelled.id == job.id
    return cancelled


def test_uploads_stream_paths_files_and_bytes(client: Client, uploaded: Uploaded) -> None:
    model, calib = uploaded.model, uploaded.calib
    assert (model.filename, model.format) == ("mlp.pt", "torchscript")
    assert model.sha256 == hashlib.sha256(uploaded.model_bytes).hexdigest()
    assert model.size == len(uploaded.model_bytes)
    assert (calib.filename, calib.format) == ("calib.npz", "npz")
    assert calib.sha256 == hashlib.sha256(uploaded.calib_bytes).hexdigest()
    assert uploaded.test.filename == "test.npz"
    assert client.model(model.id) == model and client.dataset(calib) == calib
    assert model.created_at is not None and model.created_at.tzinfo is not None
    assert model.id in {m.id for m in client.models()}
    assert {calib.id, uploaded.test.id} <= {d.id for d in client.datasets(page_size=1)}


def test_submit_wait_and_download_the_bytes_the_api_serves(
    service: Served, client: Client, uploaded: Uploaded, finished: Finished, tmp_path: Path
) -> None:
    job = finished.job
    assert job.status == "succeeded" and job.is_final and job.progress == 1.0
    assert (job.model_id, job.dataset_id) == (uploaded.model.id, uploaded.calib.id)
    assert job.eval_dataset_id == uploaded.test.id and job.error is None
    assert job.result is not None and job.result["metrics"]["finetuned"] is not None
    artifacts = {a.name: a for a in client.artifacts(job)}
    assert set(artifacts) >= OUTPUTS, sorted(artifacts)
    # To a folder, to a file path, and to a folder that does not exist yet (a trailing /).
    wanted = [
        ("model.pt", tmp_path, tmp_path / "model.pt"),
        ("report.json", tmp_path / "r.json", tmp_path / "r.json"),
        ("model.mpq.safetensors", f"{tmp_path}/new/", tmp_path / "new" / "model.mpq.safetensors"),
    ]
    with service.client() as raw:
        for name, dest, expected in wanted:
            path = client.download(job, name, dest)
            assert path == expected
            served_bytes = raw.get(f"/v1/jobs/{job.id}/artifacts/{name}").content
            assert path.read_bytes() == served_bytes
            assert hashlib.sha256(served_bytes).hexdigest() == artifacts[name].sha256
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["model.pt", "new", "new/model.mpq.safetensors", "r.json"]  # no temp left
    with pytest.raises(NotFound) as missing:
        client.download(job, "nothing.bin", tmp_path)
    assert missing.value.code == "not_found"


def test_progress_lines_name_each_state_when_not_a_terminal(finished: Finished) -> None:
    lines = finished.progress.splitlines()
    assert "\r" not in finished.progress and lines, finished.progress
    assert all(line.startswith(f"job {finished.job.id}: ") for line in lines), lines
    assert lines[-1] == f"job {finished.job.id}: succeeded, stage {finished.job.stage}, 100.0%"
    assert len(lines) == len(set(lines)), lines  # a line per change, not per poll


def test_a_failed_job_raises_job_failed_with_its_code_and_shows_progress_on_stderr(
    client: Client, uploaded: Uploaded, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = client.upload_dataset(npz_bytes(input=np.zeros((8, 7), "f4")), filename="bad.npz")
    job = client.submit(uploaded.model, wrong, budgets="avg-bits=4")
    assert job.spec["budgets"] == ["avg-bits=4"]
    with pytest.raises(JobFailed) as failed:
        client.wait(job, timeout=JOB_TIMEOUT_S)
    assert failed.value.code in {"data_mismatch", "data_shape"}, failed.value
    assert failed.value.job.status == "failed" and failed.value.job.error is not None
    assert (
        failed.value.message == failed.value.job.error.message and "input" in failed.value.message
    )
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith(f"job {job.id}: ") for line in err), err
    assert err[-1].startswith(f"job {job.id}: failed"), err


def test_errors_carry_the_api_code_and_message(
    service: Served, client: Client, uploaded: Uploaded, tmp_path: Path
) -> None:
    with pytest.raises(NotFound) as missing:
        client.job("no-such-job")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert missing.value.message == "job 'no-such-job' not found"

    body = {"model_id": uploaded.model.id, "dataset_id": uploaded.calib.id}
    with service.client() as raw:
        answer = raw.post("/v1/jobs", json={**body, "spec": {"budgets": ["avg-bits=lots"]}})
    assert answer.status_code == 422, answer.text
    with pytest.raises(InvalidRequest) as bad_budget:
        client.submit(uploaded.model, uploaded.calib, budgets=["avg-bits=lots"])
    assert bad_budget.value.status == 422
    expected = answer.json()["error"]
    assert (bad_budget.value.code, bad_budget.value.message) == (
        expected["code"],
        expected["message"],
    )

    with pytest.raises(InvalidRequest) as not_a_model:
        client.upload_model(b"not a model at all", filename="x.pt")
    assert (not_a_model.value.status, not_a_model.value.code) == (415, "model_format")
    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * (2 * MAX_UPLOAD_BYTES))
    with pytest.raises(InvalidRequest) as too_large:
        client.upload_model(big)
    assert (too_large.value.status, too_large.value.code) == (413, "upload_too_large")

    with Client(service.base_url, "mpq_not-a-key") as stranger, pytest.raises(Unauthorized) as who:
        list(stranger.jobs())
    assert (who.value.status, who.value.code) == (401, "unauthorized")


def test_wait_timeout_then_cancel(client: Client, uploaded: Uploaded) -> None:
    job = client.submit(uploaded.model, uploaded.calib, SPEC, finetune={"epochs": 50})
    with pytest.raises(WaitTimeout) as late:
        client.wait(job, timeout=0, progress=False)
    assert isinstance(late.value, TimeoutError) and late.value.job.id == job.id
    assert late.value.job.status in {"queued", "running"}

    cancelled = client.cancel(job)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(JobCancelled) as stopped:
        client.wait(job, progress=False)
    assert stopped.value.job.status == "cancelled"
    with pytest.raises(Conflict) as again:
        client.cancel(job)
    assert again.value.code == "job_finished"


def test_jobs_iterates_every_page(client: Client, uploaded: Uploaded) -> None:
    made = [_submit_and_cancel(client, uploaded) for _ in range(3)]
    listed = list(client.jobs(page_size=2))
    ids = [j.id for j in listed]
    assert len(ids) == len(set(ids)) and {j.id for j in made} <= set(ids)
    assert len(ids) == len(list(client.jobs(page_size=100)))
    times = [j.created_at for j in listed]
    assert all(t is not None for t in times) and times == sorted(times, reverse=True)  # type: ignore[type-var]
    listing = client.jobs(page_size=2)
    assert listing.total == len(ids)
    pages = list(listing.pages())
    assert len(pages) == (len(ids) + 1) // 2 and all(p.total == len(ids) for p in pages)
    assert all(len(p.items) == 2 and p.next_cursor is not None for p in pages[:-1])
    assert pages[-1].next_cursor is None
    assert [j.id for p in pages for j in p.items] == ids


def test_jobs_filters(client: Client, uploaded: Uploaded) -> None:
    made = [_submit_and_cancel(client, uploaded) for _ in range(3)]
    made_ids = {j.id for j in made}
    cancelled = list(client.jobs(status="cancelled", page_size=1))
    assert made_ids <= {j.id for j in cancelled}
    assert all(j.status == "cancelled" for j in cancelled)
    on_model = list(client.jobs(model=uploaded.model, page_size=2))
    assert made_ids <= {j.id for j in on_model}
    assert all(j.model_id == uploaded.model.id for j in on_model)
    on_test = list(client.jobs(dataset=uploaded.test))
    assert all(uploaded.test.id in (j.dataset_id, j.eval_dataset_id) for j in on_test)
    assert not made_ids & {j.id for j in on_test}  # made on the calibration data only
    since = made[0].created_at
    assert since is not None
    after = list(client.jobs(created_after=since))
    assert made_ids <= {j.id for j in after}
    assert all(j.created_at is not None and j.created_at >= since for j in after)
    before = {j.id for j in client.jobs(created_before=since)}
    assert not made_ids & before
    assert client.jobs(created_after=since, status="cancelled", page_size=1).total == len(made)


def test_delete_a_queued_job(client: Client, uploaded: Uploaded) -> None:
    job = client.submit(uploaded.model, uploaded.calib, SPEC, finetune={"epochs": 50})
    client.delete_job(job)  # cancelled first, then deleted
    with pytest.raises(NotFound):
        client.job(job.id)
    with pytest.raises(NotFound):
        client.delete_job(job.id)


def test_delete_model_and_dataset_once_no_job_uses_them(
    client: Client, zoo_bytes: Callable[[str, str], bytes]
) -> None:
    model = client.upload_model(zoo_bytes("mlp", "script"), filename="gone.pt")
    data = client.upload_dataset(mlp_npz(16), filename="gone.npz")
    job = client.submit(model, data, SPEC, finetune={"epochs": 50})
    for delete, upload in ((client.delete_model, model), (client.delete_dataset, data)):
        with pytest.raises(Conflict) as busy:
            delete(upload)
        assert busy.value.code == "in_use" and job.id in busy.value.message
    client.cancel(job)
    client.delete_model(model)
    client.delete_dataset(data.id)
    with pytest.raises(NotFound):
        client.model(model)
    with pytest.raises(NotFound):
        client.delete_dataset(data)
    assert model.id not in {m.id for m in client.models()}
    ended = client.job(job)
    assert (ended.status, ended.model_id, ended.dataset_id) == ("cancelled", None, None)


def test_a_redirect_to_another_host_gets_no_api_key(
    service: Served, finished: Finished, tmp_path: Path
) -> None:
    with presigning(service.base_url, service.key) as hosts, Client(hosts.url, service.key) as mpq:
        path = mpq.download(finished.job, "model.pt", tmp_path)
        with service.client() as raw:
            assert (
                path.read_bytes()
                == raw.get(f"/v1/jobs/{finished.job.id}/artifacts/model.pt").content
            )
        front, storage = hosts.front.seen, hosts.storage.seen
        assert front and all(h.get("authorization") == f"Bearer {service.key}" for h in front)
        assert storage and all("authorization" not in h for h in storage), storage
        assert storage[-1]["host"].startswith("localhost:")
        # The presigned URL is followed as given, its signature (the query) included.
        assert hosts.storage.paths == [
            f"/v1/jobs/{finished.job.id}/artifacts/model.pt?X-Signature=abc"
        ]

        hosts.storage.tamper = True
        with pytest.raises(DownloadCorrupt):
            mpq.download(finished.job, "report.json", tmp_path / "report.json")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing half-written
