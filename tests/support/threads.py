"""Running the same code in several threads at once (races between workers, replicas)."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["run_at_once"]


def run_at_once(
    target: Callable[[threading.Barrier], object], count: int = 2, timeout_s: float = 60.0
) -> None:
    """Run ``target(barrier)`` in ``count`` threads (``barrier.wait()`` lines them up at the
    points that must race) and wait for all; the first error of any thread is raised here."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(barrier)
        except BaseException as exc:  # re-raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout_s} s"
    if errors:
        raise errors[0]
