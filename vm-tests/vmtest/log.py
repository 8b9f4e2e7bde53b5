"""Progress of the test bed on stderr, with per-phase timings kept for a summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
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

#: A file every pytest worker (pytest-xdist) appends its timings to as well, so that the
#: summary has them all; vm-tests/conftest.py names it.
TIMINGS_FILE = "SEAMLESS_VM_TIMINGS"


def record(phase: str, seconds: float) -> None:
    timings.append((phase, seconds))
    path = os.environ.get(TIMINGS_FILE)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps([phase, seconds]) + "\n")
    log.info("%s: %.1f s", phase, seconds)


def recorded() -> list[tuple[str, float]]:
    """Every timing of the run: from the shared file when there is one, else this
    process's own."""
    path = os.environ.get(TIMINGS_FILE)
    if not path or not os.path.exists(path):
        return list(timings)
    with open(path) as f:
        return [(str(p), float(s)) for p, s in (json.loads(line) for line in f if line.strip())]


@contextlib.contextmanager
def step(phase: str) -> Iterator[None]:
    """Time a phase, log it and keep it in :data:`timings`."""
    log.info("%s ...", phase)
    start = time.monotonic()
    yield
    record(phase, time.monotonic() - start)
