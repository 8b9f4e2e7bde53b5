"""Probe a guest's services from the host, through forwarded ports, to see the
blackout a client sees."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmtest.errors import VMError

#: One probe of a service: its answer as an integer, or OSError/ValueError when it did
#: not answer.
Ask = Callable[[], int]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_counter(port: int, timeout: float = 0.5) -> Ask:
    """GET ``http://127.0.0.1:PORT/``, whose body is an integer (the test web server's
    counter): the answer is that integer."""
    url = f"http://127.0.0.1:{port}/"

    def ask() -> int:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.read())
    return ask


def exchange(port: int, request: bytes, reply: bytes, timeout: float = 1.0) -> Ask:
    """Connect to 127.0.0.1:PORT, send ``request`` (nothing for a protocol whose server
    speaks first) and read until the reply matches the regular expression ``reply``:
    the answer is 1. A reply that does not match, or none, is no answer."""
    pattern = re.compile(reply, re.DOTALL)

    def ask() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request)
            data = b""
            while not pattern.match(data):
                chunk = s.recv(512)
                if not chunk or len(data) > 4096:
                    raise ValueError(f"no answer: {data[:80]!r}")
                data += chunk
        return 1
    return ask


class Prober(threading.Thread):
    """Call ``ask`` every ``interval`` seconds; keeps (time, answer) of every answered
    probe."""

    def __init__(self, ask: Ask, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.ask = ask
        self.interval = interval
        self.answers: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t = time.monotonic()
            try:
                self.answers.append((t, self.ask()))
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


def measure_blackouts(asks: Mapping[str, Ask], switch: Callable[[], object], *,
                      interval: float = 0.05, first_answer: float = 120,
                      timeout: float = 600) -> dict[str, Blackout]:
    """Probe each named service while ``switch()`` takes the guest through a kernel
    change or reboot: for each, the longest gap between answers, and the last answer.

    Waits up to ``first_answer`` seconds for every service to answer at all first: a
    freshly booted guest's network may still be coming up."""
    probers = {name: Prober(ask, interval) for name, ask in asks.items()}
    for prober in probers.values():
        prober.start()
    try:
        deadline = time.monotonic() + first_answer
        while (silent := [n for n, p in probers.items() if not p.answers]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        if silent:
            raise VMError(f"{', '.join(silent)} did not answer (forwarded into the guest) "
                          f"after {first_answer:.0f} s")
        started = time.monotonic()
        switch()
        # A service may answer during the whole switch command (a preflight), and
        # only come back some time after it returned (the new kernel's network):
        # the gap is over only once it answers after the command ended.
        switched = time.monotonic()
        deadline = switched + timeout
        while (silent := [n for n, p in probers.items() if not p.answered_since(switched)]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        for prober in probers.values():
            prober.done.set()
        for prober in probers.values():
            prober.join()
    if silent:
        raise VMError(f"{', '.join(silent)} did not answer within {timeout:.0f} s after "
                      "the switch")
    blackouts = {}
    for name, prober in probers.items():
        began, ended = prober.longest_gap()
        blackouts[name] = Blackout(ended - began, began - started, ended - started,
                                   prober.answers[-1][1])
    return blackouts


def measure_blackout(port: int, switch: Callable[[], object], *, interval: float = 0.05,
                     first_answer: float = 120, timeout: float = 600) -> Blackout:
    """:func:`measure_blackouts` of the test web server on ``port`` alone."""
    return measure_blackouts({"": http_counter(port)}, switch, interval=interval,
                             first_answer=first_answer, timeout=timeout)[""]
