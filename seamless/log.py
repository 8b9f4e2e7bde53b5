"""Logging and timed progress steps, all on stderr (stdout is for results)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("seamless")

_depth = 0


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


@contextlib.contextmanager
def complete_step(text: str) -> Iterator[None]:
    """Log ``text`` as a progress line, nested under any enclosing step, with its duration."""
    global _depth
    indent = "  " * _depth
    log.info("%s‣ %s", indent, text)
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    log.info("%s  %s done in %.2f s", indent, text, time.monotonic() - start)


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: "1 tree", "3 trees"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
