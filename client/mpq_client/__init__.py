"""mpq_client: the Python client of the mpq service's REST API, on httpx, without torch.

Example::

    from mpq_client import Client

    with Client("http://127.0.0.1:8000", "mpq_...") as mpq:
        model = mpq.upload_model("model.pt")
        calib = mpq.upload_dataset("calib.npz")
        job = mpq.wait(mpq.submit(model, calib, budgets="avg-bits=4"))
        mpq.download(job, "model.pt", "quantized.pt")
"""

from __future__ import annotations

from mpq_client._version import __version__
from mpq_client.client import Client
from mpq_client.errors import (
    Conflict,
    DownloadCorrupt,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    MpqApiError,
    MpqClientError,
    MpqConnectionError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from mpq_client.listing import Listing
from mpq_client.progress import ProgressCallback, ProgressPrinter
from mpq_client.types import Artifact, Dataset, Job, JobError, Model, Page

__all__ = [
    "Artifact",
    "Client",
    "Conflict",
    "Dataset",
    "DownloadCorrupt",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "Listing",
    "Model",
    "MpqApiError",
    "MpqClientError",
    "MpqConnectionError",
    "NotFound",
    "Page",
    "ProgressCallback",
    "ProgressPrinter",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "__version__",
]
