"""A daemon thread calling :meth:`Periodic.run_once` at a fixed interval, the first pass at once,
until stopped: the shape of every background loop of a worker process (the reaper, the webhook
dispatcher)."""

from __future__ import annotations

import threading
from typing import TypeVar

__all__ = ["Periodic"]

_Self = TypeVar("_Self", bound="Periodic")


class Periodic:
    """Subclasses define :meth:`run_once`, which must not raise (log and return instead)."""

    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self: _Self) -> _Self:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def run_once(self) -> object:
        raise NotImplementedError

    def _run(self) -> None:
        # A first pass at once: a restarted worker picks up what its predecessor left.
        while True:
            self.run_once()
            if self._stop.wait(self.interval_s):
                return
