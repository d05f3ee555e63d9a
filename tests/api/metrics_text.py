"""Reading ``GET /metrics`` in tests: Prometheus's own parser, then samples by name and labels."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class Scrape:
    """One scrape's samples, parsed by ``prometheus_client``'s parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` with exactly these labels (``le`` aside), or None."""
        for sample in self.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
        return None

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def scrape(client: httpx.Client, **headers: str) -> Scrape:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def wait_for_scrape(
    client: httpx.Client, until: Callable[[Scrape], bool], timeout_s: float = 30.0, **headers: str
) -> Scrape:
    """Scrape until ``until`` holds (a liveness bound only: a request is counted once its
    answer's last byte is sent, which may be just after the client has read it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = scrape(client, **headers)
        if until(found):
            return found
        assert time.monotonic() < deadline, "the metrics never showed what was awaited"
        time.sleep(0.1)


def json_lines(log: str, plain_prefixes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed; a line that is not a JSON object fails the test,
    unless it starts with one of ``plain_prefixes``."""
    lines = []
    for line in log.splitlines():
        if not line.strip() or line.startswith(plain_prefixes):
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"a log line is not JSON: {line!r}") from None
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    return lines
