"""Probe a guest's HTTP service from the host, through a forwarded port, to see the
blackout a client sees."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from vmtest.errors import VMError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prober(threading.Thread):
    """GET ``http://127.0.0.1:PORT/`` every ``interval`` seconds; keeps (time, answer)
    of every answered probe (the answer is the body as an integer)."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/"
        self.interval = interval
        self.answers: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=0.5) as r:
                    self.answers.append((t, int(r.read())))
            except (OSError, ValueError):
                pass
            time.sleep(max(0.0, self.interval - (time.monotonic() - t)))

    def answered_since(self, t: float) -> bool:
        return any(at > t for at, _ in self.answers)

    def longest_gap(self) -> tuple[float, float]:
        """The (start, end) of the longest time without an answer."""
        times = [at for at, _ in self.answers]
        pairs = list(zip(times, times[1:], strict=False))
        return max(pairs, key=lambda p: p[1] - p[0], default=(0.0, 0.0))


@dataclass
class Blackout:
    #: The longest time between two answers, seconds.
    seconds: float
    #: When it began and ended, seconds after the switch was started.
    began: float
    ended: float
    #: The service's last answer.
    last_answer: int


def measure_blackout(port: int, switch: Callable[[], object], *, interval: float = 0.05,
                     first_answer: float = 120, timeout: float = 600) -> Blackout:
    """Probe the service on ``port`` while ``switch()`` takes the guest through a kernel
    change or reboot: the longest gap between answers, and the last answer.

    Waits up to ``first_answer`` seconds for the service to answer at all first: a
    freshly booted guest's network may still be coming up."""
    prober = Prober(port, interval)
    prober.start()
    try:
        deadline = time.monotonic() + first_answer
        while not prober.answers and time.monotonic() < deadline:
            time.sleep(0.1)
        if not prober.answers:
            raise VMError(f"the service does not answer on 127.0.0.1:{port} "
                          f"(forwarded into the guest) after {first_answer:.0f} s")
        started = time.monotonic()
        switch()
        # The service may answer during the whole switch command (a preflight), and
        # only come back some time after it returned (the new kernel's network):
        # the gap is over only once it answers after the command ended.
        switched = time.monotonic()
        deadline = switched + timeout
        while not prober.answered_since(switched) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        prober.done.set()
        prober.join()
    if not prober.answered_since(switched):
        raise VMError(f"the service on 127.0.0.1:{port} did not answer within "
                      f"{timeout:.0f} s after the switch")
    began, ended = prober.longest_gap()
    return Blackout(ended - began, began - started, ended - started, prober.answers[-1][1])
