"""Service configuration, read from ``MPQ_*`` environment variables (and an optional ``.env``).

Build it with :func:`get_settings` (or ``Settings()``) where the app, the worker or a command
starts; nothing here reads the environment at import time, so tests make their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

_DEFAULT_DATA_DIR = Path("./mpq-data")


class Settings(BaseSettings):
    """Every setting of the service; each field is the environment variable ``MPQ_<NAME>``.

    Attributes:
        database_url: SQLAlchemy URL of the database. ``sqlite:///path`` for the embedded
            default, ``postgresql://user:pass@host/db`` in production (psycopg 3 is used).
        storage: where uploads and artifacts live: ``local`` (files under ``data_dir``) or
            ``s3`` (any S3-compatible server, see the ``s3_*`` settings).
        data_dir: directory for local storage, the default SQLite database and the default
            filesystem broker. Created on start.
        s3_endpoint_url: S3 endpoint, e.g. ``http://seaweedfs:8333``; empty means AWS.
        s3_bucket: bucket holding uploads and artifacts (required when ``storage=s3``).
        s3_access_key: S3 access key id; empty uses boto3's usual credential chain.
        s3_secret_key: S3 secret access key.
        s3_region: S3 region name.
        s3_public_endpoint_url: where clients reach the S3 server, when that differs from
            ``s3_endpoint_url`` (e.g. ``http://localhost:8333`` outside docker-compose's
            network); presigned download URLs are signed for it.
        broker_url: Celery broker URL, e.g. ``redis://redis:6379/0``. Empty means a filesystem
            broker under ``data_dir/broker`` that needs no server (embedded default).
        result_backend: Celery result backend URL. Job state lives in the database, so this is
            optional; empty disables Celery results.
        max_upload_bytes: largest accepted model or dataset upload, in bytes (413 past it).
        api_key_pepper: secret mixed into every API key hash (HMAC-SHA256). Changing it
            invalidates all existing keys.
        job_time_limit_s: hard time limit of one job attempt, in seconds; keep it below the
            broker's visibility timeout.
        job_max_attempts: how many times a job is started before it is failed for good (a job
            that kills its worker every time must fail, not loop).
        s3_max_attempts: tries of each S3 request on transient errors (refused or reset
            connections, time-outs, 5xx), with exponential backoff; then the storage is
            reported unavailable (the API answers 503 ``storage_unavailable``).
        db_pool_size, db_max_overflow: database connections the API keeps open, and how many
            more it may open under load. No connection is held while a request body streams.
        db_pool_timeout_s: how long a request waits for a free connection before it is answered
            503 ``database_unavailable``.
        sandbox: how jobs are isolated (see README, "Security"): ``auto`` uses Linux user
            namespaces where the host allows them and falls back to a limited child process
            (clean environment, resource limits, seccomp, but the host's files readable) with a
            warning; ``required`` refuses to run jobs without namespaces (use it in
            production); ``process`` never uses namespaces.
        sandbox_memory_bytes: memory limit of a job's process (``RLIMIT_DATA``); 0 means 80% of
            the machine's memory, or of the worker's cgroup limit when that is lower
            (:mod:`mpq_core.host_memory`).
        sandbox_cpu_seconds: CPU-time limit of a job's process; 0 means the job time limit
            times the number of CPUs.
        job_heartbeat_interval_s: how often a running attempt stamps ``jobs.heartbeat_at``.
        job_stale_after_s: a running job whose heartbeat is older than this is presumed
            orphaned (its worker died) and is re-queued by the reaper, or failed with
            ``worker_lost_repeatedly`` once it has been started ``job_max_attempts`` times. Keep
            it well above the heartbeat interval and above the database blips you expect to
            ride out; at least three heartbeat intervals.
        reaper_interval_s: how often each worker process (and ``mpq serve``) looks for
            orphaned jobs.
        job_final_write_retry_s: how long an attempt keeps retrying its final status write
            through database errors (with backoff) before leaving the job to the reaper.
        worker_stop_timeout_s: ``mpq serve`` only: how long its worker may take to stop (warm
            shutdown: it finishes its job) before it is killed; a killed worker's job is
            re-queued at the next start.
        webhook_secret: key of the ``X-MPQ-Signature`` HMAC on every webhook call (see
            :mod:`mpq_service.webhook_signature`). Unset with local storage (one machine, e.g.
            ``mpq serve``): generated once and kept in ``data_dir/webhook-secret``. Unset with
            S3 storage (several machines): jobs with a ``webhook_url`` are refused.
        webhook_allow_private: deliver webhooks to loopback, private, link-local and other
            non-public addresses too. Off by default: the workers would otherwise be a way to
            reach the service's own network (metadata servers, databases) for any tenant.
        webhook_timeout_s: time limit of each step (connect, send, read) of one webhook call.
        webhook_retry_delays_s: waits before each retry of a failed webhook call (a JSON list
            in the environment); after the last one the delivery is given up.
        webhook_interval_s: how often each worker looks for finished jobs to announce and
            webhook calls that are due.
        events_poll_interval_s: how often a job's event stream (``GET /v1/jobs/{id}/events``)
            reads the job.
        events_keepalive_s: a comment line is sent on an idle event stream this often, so
            proxies do not close it.
        events_max_lifetime_s: an event stream is closed after this long (the client
            reconnects), so no connection lives forever.
        log_format: ``json`` (one object per line, with ``request_id`` and ``job_id``),
            ``text``, or ``auto``: text when stderr is a terminal, JSON otherwise (containers,
            service managers and files feed log collectors). ``mpq serve`` and the Celery
            worker use it; see :mod:`mpq_service.logs`.
        metrics_token: when set, ``GET /metrics`` requires ``Authorization: Bearer <token>``;
            empty (the default) leaves it open, for a scraper on a private network.
    """

    model_config = SettingsConfigDict(
        env_prefix="MPQ_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    database_url: str = ""
    storage: Literal["local", "s3"] = "local"
    data_dir: Path = _DEFAULT_DATA_DIR
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_public_endpoint_url: str | None = None
    broker_url: str = ""
    result_backend: str | None = None
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    api_key_pepper: SecretStr = SecretStr("")
    job_time_limit_s: int = Field(default=6 * 3600, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    s3_max_attempts: int = Field(default=5, ge=1, le=20)
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    sandbox: Literal["auto", "required", "process"] = "auto"
    sandbox_memory_bytes: int = Field(default=0, ge=0)
    sandbox_cpu_seconds: int = Field(default=0, ge=0)
    job_heartbeat_interval_s: float = Field(default=5.0, gt=0)
    job_stale_after_s: float = Field(default=120.0, gt=0)
    reaper_interval_s: float = Field(default=30.0, gt=0)
    job_final_write_retry_s: float = Field(default=120.0, ge=0)
    worker_stop_timeout_s: float = Field(default=10.0, ge=0)
    webhook_secret: SecretStr | None = None
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retry_delays_s: list[float] = Field(
        default_factory=lambda: [10.0, 30.0, 120.0, 600.0, 3600.0]
    )
    webhook_interval_s: float = Field(default=2.0, gt=0)
    events_poll_interval_s: float = Field(default=0.5, gt=0)
    events_keepalive_s: float = Field(default=15.0, gt=0)
    events_max_lifetime_s: float = Field(default=3600.0, gt=0)
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_token: SecretStr | None = None

    @model_validator(mode="after")
    def _fill_derived_defaults(self) -> Settings:
        # Defaults that depend on data_dir are filled here, so MPQ_DATA_DIR moves them all.
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'mpq.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("MPQ_S3_BUCKET is required when MPQ_STORAGE=s3")
        if self.job_stale_after_s < 3 * self.job_heartbeat_interval_s:
            # A live attempt would look orphaned after one late heartbeat and be re-queued.
            raise ValueError(
                "MPQ_JOB_STALE_AFTER_S must be at least 3 x MPQ_JOB_HEARTBEAT_INTERVAL_S"
            )
        if any(d < 0 for d in self.webhook_retry_delays_s):
            raise ValueError("MPQ_WEBHOOK_RETRY_DELAYS_S: delays must not be negative")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker (used when ``broker_url`` is ``filesystem://``)."""
        return self.data_dir / "broker"


def get_settings() -> Settings:
    """Read and validate the settings from the environment (a fresh object on every call)."""
    return Settings()
