"""Waiting for a job over the REST API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["FINAL_STATUSES", "JobWaitError", "wait_for_job"]

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class JobWaitError(RuntimeError):
    """The job did not finish in time, its status could not be read, or a process it needs
    died; the message says which (with the caller's context)."""


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    *,
    timeout_s: float,
    interval_s: float = 0.2,
    check: Callable[[], str | None] | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    describe: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{job_id}`` until the job is final and return it.

    Args:
        client: an httpx client with the service's base URL and credentials.
        timeout_s: give up (``JobWaitError``) after this long.
        check: called between polls; a string it returns (say, "the worker died" and a log)
            aborts the wait with that message.
        on_update: called with every job document read (e.g. to print progress).
        describe: context appended to every error (e.g. the services' log tails).
    """
    try:
        return _poll(client, job_id, timeout_s, interval_s, check, on_update)
    except JobWaitError as exc:
        if describe is None:
            raise
        raise JobWaitError(f"{exc}\n{describe()}") from None


def _poll(
    client: httpx.Client,
    job_id: str,
    timeout_s: float,
    interval_s: float,
    check: Callable[[], str | None] | None,
    on_update: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            raise JobWaitError(f"GET job {job_id}: {response.status_code} {response.text[:500]}")
        job = response.json()
        if on_update is not None:
            on_update(job)
        if job["status"] in FINAL_STATUSES:
            return job
        problem = check() if check is not None else None
        if problem:
            raise JobWaitError(f"job {job_id} is {job['status']} but {problem}")
        if time.monotonic() > deadline:
            raise JobWaitError(
                f"job {job_id} not finished after {timeout_s:.0f} s (status {job['status']}, "
                f"stage {job.get('stage')}, progress {job.get('progress')})"
            )
        time.sleep(interval_s)
