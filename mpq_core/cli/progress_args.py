"""The progress flags of the long commands (``analyze``, ``quantize``, ``sweep``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpq_core.progress_display import ProgressDisplay

__all__ = ["DEFAULT_PROGRESS_EVERY_S", "add_progress_arguments", "progress_from_args"]

#: Least seconds between two progress lines in a log (stderr not a terminal).
DEFAULT_PROGRESS_EVERY_S = 5.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def add_progress_arguments(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` and ``--progress-every SECONDS``."""
    p.add_argument("--no-progress", action="store_true", help="report no progress on stderr")
    p.add_argument(
        "--progress-every",
        type=_seconds,
        default=DEFAULT_PROGRESS_EVERY_S,
        metavar="SECONDS",
        help="when stderr is not a terminal (a log), progress is plain lines: one as each stage "
        "starts and ends, and a progress line at most this often; 0 writes every report "
        "(default: %(default)s)",
    )


def progress_from_args(args: argparse.Namespace) -> ProgressDisplay:
    """The progress display the flags ask for: bars on a terminal, lines in a log, or none."""
    from mpq_core.progress_display import stderr_progress

    return stderr_progress(enabled=not args.no_progress, interval_s=args.progress_every)
