"""Progress of the test bed on stderr, with per-phase timings kept for a summary."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("vmtest")
if not log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("vm: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

#: (phase, seconds) of every timed step in this process, in order.
timings: list[tuple[str, float]] = []


def record(phase: str, seconds: float) -> None:
    timings.append((phase, seconds))
    log.info("%s: %.1f s", phase, seconds)


@contextlib.contextmanager
def step(phase: str) -> Iterator[None]:
    """Time a phase, log it and keep it in :data:`timings`."""
    log.info("%s ...", phase)
    start = time.monotonic()
    yield
    record(phase, time.monotonic() - start)
