"""A worker's liveness file, and the check a container healthcheck runs against it.

While a worker's consumer is connected to the broker, a Celery consumer bootstep
(:class:`AliveFile`) touches ``MPQ_DATA_DIR/worker-alive.HOSTNAME`` every
:data:`TOUCH_INTERVAL_S` seconds from the consumer's own timer, so a stuck event loop stops
touching it; when the consumer stops (shutdown, or the broker connection lost: Celery stops and
restarts the consumer's steps) the file is removed. Jobs run in the prefork pool's child, so a
long job does not hold the touches back (with ``--pool solo`` it would).

``python -m worker.liveness [--max-age SECONDS]`` exits 0 when the file is younger than
``--max-age`` and 1 otherwise, with one line saying why: docker-compose.yml's worker
healthcheck. It reads only the settings and the file's time, never the broker, so it is cheap
and answers even while the broker is away (then with 1, the consumer having stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import bootsteps

__all__ = [
    "CONF_KEY",
    "DEFAULT_MAX_AGE_S",
    "TOUCH_INTERVAL_S",
    "AliveFile",
    "alive_path",
    "check",
    "main",
]

#: The app setting holding the file's path (:func:`worker.celery_app.make_worker_celery`).
CONF_KEY = "mpq_alive_file"
#: Seconds between two touches of a connected consumer.
TOUCH_INTERVAL_S = 10.0
#: Age past which the check fails: several missed touches, not one slow one.
DEFAULT_MAX_AGE_S = 60.0


def alive_path(data_dir: Path) -> Path:
    """The liveness file of this host's worker (one worker per container, each its host name)."""
    return data_dir / f"worker-alive.{socket.gethostname()}"


class AliveFile(bootsteps.StartStopStep):
    """The consumer step that keeps :func:`alive_path` fresh while the consumer runs."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path: Path | None = None
        self.timer_ref: Any = None

    def start(self, parent: Any) -> None:
        self.path = Path(parent.app.conf[CONF_KEY])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.touch()
        self.timer_ref = parent.timer.call_repeatedly(TOUCH_INTERVAL_S, self.touch)

    def touch(self) -> None:
        if self.path is not None:
            self.path.touch()

    def stop(self, parent: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


def check(path: Path, max_age_s: float, now: float | None = None) -> str | None:
    """Why the worker owning ``path`` is not alive, or None when it is."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return f"{path} is missing: the worker is not connected to its broker, or not running"
    if age > max_age_s:
        return f"{path} was last touched {age:.0f} s ago (more than {max_age_s:g} s)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The healthcheck: 0 when this host's worker touched its file within ``--max-age``."""
    parser = argparse.ArgumentParser(prog="python -m worker.liveness", description=__doc__)
    parser.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help="oldest touch that still counts as alive (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    from mpq_service.settings import get_settings

    why = check(alive_path(get_settings().data_dir), args.max_age)
    if why is not None:
        print(f"worker not alive: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
