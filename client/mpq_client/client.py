"""The :class:`Client`: every operation of the mpq REST API as one typed method."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from mpq_client._files import UploadSource, save_stream, upload_body
from mpq_client._http import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, Http, retry_after_s
from mpq_client._version import __version__
from mpq_client.errors import JobCancelled, JobFailed, NotFound, WaitTimeout
from mpq_client.listing import Listing
from mpq_client.progress import ProgressCallback, ProgressPrinter
from mpq_client.types import Artifact, Dataset, Job, Model, Page

__all__ = ["DEFAULT_POLL_S", "Client"]

T = TypeVar("T")
DEFAULT_POLL_S = 2.0  # between polls when the server sends no Retry-After
MIN_POLL_S = 0.1
PAGE_SIZE = 50

JobRef = str | Job
ModelRef = str | Model
DatasetRef = str | Dataset


def _id(ref: str | Model | Dataset | Job) -> str:
    return ref if isinstance(ref, str) else ref.id


def _path(*parts: str | Model | Dataset | Job) -> str:
    """``/v1/`` and the parts, ids quoted: ``_path("jobs", job, "cancel")``."""
    return "/v1/" + "/".join(quote(_id(p), safe="") for p in parts)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _finished(job: Job) -> Job:
    if job.status == "failed":
        raise JobFailed(job)
    if job.status == "cancelled":
        raise JobCancelled(job)
    return job


class Client:
    """A client of one mpq service, authenticated with one API key.

    Example::

        from mpq_client import Client

        with Client("http://127.0.0.1:8000", "mpq_...") as mpq:
            model = mpq.upload_model("model.pt")
            data = mpq.upload_dataset("calib.npz")
            job = mpq.wait(mpq.submit(model, data, budgets=["avg-bits=4"]))
            mpq.download(job, "model.pt", "quantized.pt")

    Args:
        url: the service's base URL (``http://host:port``).
        key: the API key (``mpq keys create``); None sends none.
        timeout: seconds per request (connect, read, write), or an ``httpx.Timeout``.
        transport: an httpx transport to send requests through (proxies, tests).
        retries: how often a GET is retried on a connection error, 429 or 503.
    """

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self._http = Http(
            url,
            key,
            timeout=timeout,
            transport=transport,
            retries=retries,
            user_agent=f"mpq-client/{__version__}",
        )

    @property
    def url(self) -> str:
        """The service's base URL."""
        return str(self._http.base_url)

    def close(self) -> None:
        """Close the connections (also done on leaving a ``with`` block)."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._http.request("GET", path, params=params).json()

    def _listing(
        self, path: str, params: Mapping[str, Any], parse: Callable[[Mapping[str, Any]], T]
    ) -> Listing[T]:
        def fetch(cursor: str | None) -> Page[T]:
            doc = self._get(path, {**params, "cursor": cursor})
            total = doc.get("total")
            return Page(
                [parse(item) for item in doc.get("items") or []],
                doc.get("next_cursor") or None,
                total if isinstance(total, int) else None,
            )

        return Listing(fetch)

    # --- uploads ---------------------------------------------------------------------------

    def _upload(self, path: str, source: UploadSource, filename: str | None) -> Any:
        with upload_body(source, filename) as (body, headers, name):
            response = self._http.request(
                "POST", path, params={"filename": name}, content=body, headers=headers
            )
        return response.json()

    def upload_model(self, source: UploadSource, filename: str | None = None) -> Model:
        """Upload a TorchScript archive or ``torch.export`` program, streamed from a path, an
        open binary file or bytes; ``filename`` (default: the file's name) names downloads.

        Example::

            model = mpq.upload_model("resnet18.pt")

        Raises:
            InvalidRequest: not a model mpq reads (``model_format``, ``model_pickle``) or too
                large (``upload_too_large``).
        """
        return Model.from_api(self._upload("/v1/models", source, filename))

    def upload_dataset(self, source: UploadSource, filename: str | None = None) -> Dataset:
        """Upload calibration or evaluation data (``.npz`` or ``.safetensors``), streamed like
        :meth:`upload_model`.

        Example::

            calib = mpq.upload_dataset("calib.npz")

        Raises:
            InvalidRequest: not a data file mpq reads (``data_format``, ``data_pickle``).
        """
        return Dataset.from_api(self._upload("/v1/datasets", source, filename))

    def model(self, model: ModelRef) -> Model:
        """The model with this id (or the model again, as the API now reports it)."""
        return Model.from_api(self._get(_path("models", model)))

    def dataset(self, dataset: DatasetRef) -> Dataset:
        """The dataset with this id."""
        return Dataset.from_api(self._get(_path("datasets", dataset)))

    def models(self, *, page_size: int = PAGE_SIZE) -> Listing[Model]:
        """Every model of the tenant, newest first, fetched a page at a time."""
        return self._listing("/v1/models", {"limit": page_size}, Model.from_api)

    def datasets(self, *, page_size: int = PAGE_SIZE) -> Listing[Dataset]:
        """Every dataset of the tenant, newest first, fetched a page at a time."""
        return self._listing("/v1/datasets", {"limit": page_size}, Dataset.from_api)

    def delete_model(self, model: ModelRef) -> None:
        """Delete an uploaded model and its file; jobs that used it and have ended stay, with
        ``model_id`` None.

        Raises:
            Conflict: ``in_use`` while a queued or running job uses it.
        """
        self._http.request("DELETE", _path("models", model))

    def delete_dataset(self, dataset: DatasetRef) -> None:
        """Delete an uploaded dataset and its file; jobs that used it and have ended stay,
        with ``dataset_id`` (or ``eval_dataset_id``) None.

        Raises:
            Conflict: ``in_use`` while a queued or running job uses it.
        """
        self._http.request("DELETE", _path("datasets", dataset))

    # --- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        model: ModelRef,
        dataset: DatasetRef,
        spec: Mapping[str, Any] | None = None,
        *,
        eval_dataset: DatasetRef | None = None,
        budgets: str | Sequence[str] | None = None,
        **options: Any,
    ) -> Job:
        """Queue a job on an uploaded model and dataset (ids or the uploaded objects).

        The job spec is ``spec`` (everything ``mpq quantize`` accepts, as JSON) with
        ``budgets`` and the keyword ``options`` set on top of it.

        Example::

            job = mpq.submit(model, calib, eval_dataset=test, budgets="avg-bits=3",
                             pins={"conv1\\\\.weight": 8}, finetune={"epochs": 5})

        Raises:
            InvalidRequest: the spec is invalid (the message names the field).
            NotFound: no such model or dataset.
        """
        body_spec = {**(spec or {}), **options}
        if budgets is not None:
            body_spec["budgets"] = [budgets] if isinstance(budgets, str) else list(budgets)
        body: dict[str, Any] = {
            "model_id": _id(model),
            "dataset_id": _id(dataset),
            "spec": body_spec,
        }
        if eval_dataset is not None:
            body["eval_dataset_id"] = _id(eval_dataset)
        return Job.from_api(self._http.request("POST", "/v1/jobs", json=body).json())

    def job(self, job: JobRef) -> Job:
        """The job as it is now (status, stage, progress, error, result)."""
        return Job.from_api(self._get(_path("jobs", job)))

    def wait(
        self,
        job: JobRef,
        *,
        timeout: float | None = None,
        progress: bool | ProgressCallback = True,
    ) -> Job:
        """Poll the job until it ends, as often as the server's ``Retry-After`` asks, and
        return it once it succeeded.

        ``progress``: True shows it on stderr (a bar on a terminal, lines otherwise), False
        shows nothing, a callable is called with every :class:`Job` read.

        Example::

            job = mpq.wait(job, timeout=3600)
            print(job.result["metrics"])

        Raises:
            JobFailed: the job failed (``code`` and ``message`` are its error).
            JobCancelled: the job was cancelled.
            WaitTimeout: still running after ``timeout`` seconds (it keeps running).
        """
        show = ProgressPrinter() if progress is True else (progress or None)
        try:
            return self._poll(_id(job), timeout, show)
        finally:
            if isinstance(show, ProgressPrinter):
                show.close()

    def _poll(self, job_id: str, timeout: float | None, show: ProgressCallback | None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        path = _path("jobs", job_id)
        while True:
            response = self._http.request("GET", path)
            current = Job.from_api(response.json())
            if show is not None:
                show(current)
            if current.is_final:
                return _finished(current)
            asked = retry_after_s(response)
            delay = max(DEFAULT_POLL_S if asked is None else asked, MIN_POLL_S)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(current, timeout or 0.0)
                delay = min(delay, left)
            time.sleep(delay)

    def jobs(
        self,
        *,
        status: str | None = None,
        model: ModelRef | None = None,
        dataset: DatasetRef | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Listing[Job]:
        """Every job of the tenant matching the filters, newest first, fetched a page at a
        time as the iteration goes on; ``.total`` counts them, ``.pages()`` gives the pages.

        ``dataset`` matches calibration and evaluation data; ``created_after`` (inclusive) and
        ``created_before`` (exclusive) are timezone-aware datetimes.

        Example::

            for job in mpq.jobs(status="failed"):
                print(job.id, job.error.code)
        """
        params = {
            "status": status,
            "model_id": None if model is None else _id(model),
            "dataset_id": None if dataset is None else _id(dataset),
            "created_after": _time(created_after),
            "created_before": _time(created_before),
            "limit": page_size,
        }
        return self._listing("/v1/jobs", params, Job.from_api)

    def cancel(self, job: JobRef) -> Job:
        """Cancel a queued or running job (a running one stops at its next checkpoint).

        Raises:
            Conflict: ``job_finished`` once it has ended.
        """
        path = _path("jobs", job, "cancel")
        return Job.from_api(self._http.request("POST", path).json())

    def delete_job(self, job: JobRef) -> None:
        """Delete a job and its artefacts; a queued or running job is cancelled first."""
        self._http.request("DELETE", _path("jobs", job))

    # --- artefacts -------------------------------------------------------------------------

    def artifacts(self, job: JobRef) -> list[Artifact]:
        """The job's output files (empty until it has produced some)."""
        doc = self._get(_path("jobs", job, "artifacts"))
        return [Artifact.from_api(item) for item in doc.get("items") or []]

    def download(self, job: JobRef, name: str, dest: str | Path = ".") -> Path:
        """Download the artefact ``name`` of the job to ``dest`` (a folder, where it keeps its
        name, made if the path ends with a slash; or a file path) and return the path written.

        The file is streamed to a temporary file next to ``dest`` and renamed into place only
        once its size and sha256 match the job's artifact list. A redirect to presigned storage
        is followed without sending the API key there.

        Example::

            path = mpq.download(job, "model.pt", "out/")

        Raises:
            NotFound: the job has no artefact of that name.
            DownloadCorrupt: the bytes received differ from the listed sha256.
        """
        listed = {a.name: a for a in self.artifacts(job)}
        artifact = listed.get(name)
        if artifact is None:
            raise NotFound(404, "not_found", f"artifact {name!r} not found")
        target = Path(dest)
        if str(dest).endswith(("/", os.sep)):
            target.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            target = target / name
        url = artifact.url or _path("jobs", job, "artifacts", name)
        return save_stream(self._http.get_following(url), artifact, target)
