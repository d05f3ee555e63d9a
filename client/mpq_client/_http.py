"""Requests to the service: the API key sent only to the service's own origin, error answers
raised as :mod:`mpq_client.errors`, idempotent requests retried on transient failures, and
redirects (a download's 307 to a presigned storage URL) followed by hand so that the key never
reaches another host."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

import httpx

from mpq_client.errors import MpqApiError, MpqConnectionError, api_error

__all__ = ["DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "Http", "retry_after_s"]

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
BACKOFF_S = 0.5  # first wait before a retry; doubled each time
MAX_BACKOFF_S = 30.0
MAX_REDIRECTS = 5
_RETRIED_STATUSES = frozenset({429, 503})


def retry_after_s(response: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (delay or HTTP date); None if absent or bad."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error(response: httpx.Response) -> MpqApiError:
    """The exception for an error answer: the API's ``{"error": {"code", "message"}}`` when the
    body holds one, else ``http_<status>`` and the start of the body."""
    code, message, request_id = f"http_{response.status_code}", "", None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, Mapping):
        code = str(error.get("code") or code)
        message = str(error.get("message") or "")
        request_id = error.get("request_id")
    if not message:
        message = response.text[:300].strip() or response.reason_phrase
    request_id = request_id or response.headers.get("X-Request-ID")
    return api_error(response.status_code, code, message, request_id, retry_after_s(response))


class Http:
    """An httpx client bound to the service's base URL and API key."""

    def __init__(
        self,
        url: str,
        key: str | None,
        *,
        timeout: float | httpx.Timeout,
        transport: httpx.BaseTransport | None,
        retries: int,
        user_agent: str,
    ) -> None:
        self.base_url = httpx.URL(url.rstrip("/") + "/")
        self.retries = retries
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": user_agent},
        )

    def close(self) -> None:
        self._client.close()

    def url(self, path: str | httpx.URL) -> httpx.URL:
        """``path`` (relative to the base URL, or absolute) as an absolute URL."""
        target = httpx.URL(path) if isinstance(path, str) else path
        if target.is_relative_url:
            return self.base_url.join(str(target).lstrip("/"))
        return target

    def _own_origin(self, url: httpx.URL) -> bool:
        base = self.base_url
        return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)

    def request(
        self,
        method: str,
        path: str | httpx.URL,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        retry: bool | None = None,
    ) -> httpx.Response:
        """Send one request and return its successful (2xx or 3xx) response.

        ``retry`` (default: for GET only) retries connection failures, 429 and 503 with
        backoff, honouring ``Retry-After``; a streamed ``content`` is never retried.

        Raises:
            MpqApiError: (a subclass by status) the API answered with an error.
            MpqConnectionError: the service could not be reached.
        """
        url = self.url(path)
        sent = {**(self._auth if self._own_origin(url) else {}), **(headers or {})}
        # None, not {}: httpx replaces the URL's own query (a presigned URL's signature) with
        # an empty params mapping.
        query = {k: v for k, v in (params or {}).items() if v is not None} or None
        attempts = 1 + (self.retries if (method == "GET" if retry is None else retry) else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = self._client.build_request(
                method, url, params=query, json=json, content=content, headers=sent
            )
            try:
                response = self._client.send(request, stream=stream)
            except httpx.TransportError as exc:
                if last:
                    raise MpqConnectionError(f"{method} {url}: {exc!r}") from exc
                time.sleep(_backoff(attempt))
                continue
            if response.status_code in _RETRIED_STATUSES and not last:
                response.close()
                asked = retry_after_s(response)
                time.sleep(min(_backoff(attempt) if asked is None else asked, MAX_BACKOFF_S))
                continue
            if response.is_error:
                try:
                    response.read()  # the error body of a streamed response
                except httpx.TransportError as exc:
                    raise MpqConnectionError(f"{method} {url}: {exc!r}") from exc
                finally:
                    response.close()
                raise _error(response)
            return response
        raise AssertionError("unreachable")  # the last attempt returned or raised

    def get_following(self, path: str) -> httpx.Response:
        """``GET path`` streamed, following redirects; the API key goes only to the service's
        own origin, never to the host a redirect points at (a presigned URL carries its own
        authorization). The caller closes the response."""
        response = self.request("GET", path, stream=True)
        for _ in range(MAX_REDIRECTS):
            location = response.headers.get("Location")
            if not response.is_redirect or location is None:
                return response
            response.close()
            response = self.request("GET", response.url.join(location), stream=True)
        response.close()
        raise MpqApiError(
            response.status_code, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects"
        )


def _backoff(attempt: int) -> float:
    return float(min(BACKOFF_S * 2**attempt, MAX_BACKOFF_S))
