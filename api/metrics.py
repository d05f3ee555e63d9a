"""``GET /metrics`` in Prometheus's text format, and the per-request metrics and access log.

Each app gets a registry of its own (an app built twice in one process counts apart), holding:

- ``mpq_http_requests_total{method, route, status}`` and
  ``mpq_http_request_duration_seconds{method, route}`` (a histogram, until the response's last
  byte is sent, so a streamed download counts whole). ``route`` is the route's template
  (``/v1/jobs/{job_id}``), never the raw path: ids would make one series per job.
  Paths that match no route share ``route="unmatched"``; unknown methods ``method="other"``.
- the database's metrics, read at scrape time (:class:`api.job_metrics.JobMetrics`);
- the process's own (CPU, memory, open files, garbage collection).

A client that goes away before its answer is counted as status 499 (like nginx). ``/metrics``
is open unless ``MPQ_METRICS_TOKEN`` is set; then it takes ``Authorization: Bearer <token>``.

:class:`RequestMetrics` also writes the access log: one line per request at INFO on the logger
``mpq.access`` (method, path, route, status, duration) with its request id. A pure ASGI
middleware: ``BaseHTTPMiddleware`` would buffer streamed responses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import Unauthorized
from api.job_metrics import JobMetrics
from mpq_service.settings import Settings

__all__ = ["RequestMetrics", "install_metrics", "route_template"]

access_log = logging.getLogger("mpq.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Upper bounds of the latency buckets: most answers take milliseconds, uploads minutes.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CLIENT_GONE = 499


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (``/v1/jobs/{job_id}``), or
    ``unmatched``.

    Starlette's router leaves the route in ``scope["route"]``; its path is relative to the
    router it was declared in (``/jobs/{job_id}`` under the ``/v1`` router), so the prefixes are
    put back from the request's path: as many leading segments as the template does not cover.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    path: str = scope.get("path", "")
    if not isinstance(template, str):
        return "unmatched"
    if isinstance(route, Mount):  # its {path} spans any number of segments
        at = path.find(template)
        return f"{path[: max(at, 0)]}{template}/{{path}}"
    if ":path}" in template:
        return template
    parts = path.split("/")
    depth = template.count("/")
    return "/".join(parts[: len(parts) - depth]) + template if depth < len(parts) else template


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request, and logging its access line."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "mpq_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mpq_http_request_duration_seconds",
            "Time from a request's arrival to its answer's last byte, by method and route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except asyncio.CancelledError:
            status = status or CLIENT_GONE
            raise
        except Exception:
            status = status or 500  # Starlette's outer ServerErrorMiddleware answers it
            raise
        finally:
            self._record(scope, status or CLIENT_GONE, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope.get("method", "")
        method = method if method in _METHODS else "other"
        route = route_template(scope)
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        access_log.info(
            "%s %s %d %.1f ms",
            method,
            scope.get("path", ""),
            status,
            seconds * 1000,
            extra={
                "method": method,
                "path": scope.get("path", ""),
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
            },
        )


def _check_token(request: Request, token: str) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
        raise Unauthorized("GET /metrics requires the metrics token (MPQ_METRICS_TOKEN)")


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Give ``app`` its registry, the request-metrics middleware and ``GET /metrics``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(JobMetrics(app.state.sessionmaker))
    app.state.metrics_registry = registry
    app.add_middleware(RequestMetrics, registry=registry)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus's text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            401: {
                "description": "``MPQ_METRICS_TOKEN`` is set and the request lacks it",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"},
                        "example": {
                            "error": {"code": "unauthorized", "message": "the metrics token"}
                        },
                    }
                },
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            },
        },
    )
    def metrics(request: Request) -> Response:
        """Prometheus metrics: requests by route and status, latencies, jobs by status, queue
        depth, stage durations (see README, "Operations"). With ``MPQ_METRICS_TOKEN`` set, it
        takes ``Authorization: Bearer <token>``."""
        if token:
            _check_token(request, token)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
