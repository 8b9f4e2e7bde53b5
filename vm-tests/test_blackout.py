"""The blackout a client sees: seamless upgrade against systemctl kexec (state lost)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import HTTP_STATE, http, wait_http

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
PORT = 8080

WEB_UNIT = f"""\
[Unit]
Description=HTTP server holding state in memory
After=network.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/web.py {PORT}

[Install]
WantedBy=multi-user.target
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prober(threading.Thread):
    """GET the guest's HTTP server through the forwarded port every ``interval`` seconds;
    keeps (time, answer) of every answered probe."""

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

    def longest_gap(self) -> float:
        times = [at for at, _ in self.answers]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def measure(g: qemu.Guest, argv: list[str], port: int) -> tuple[float, int]:
    """Probe while ``argv`` switches the guest's kernel: the longest gap between answers
    and the state the server answers with afterwards."""
    prober = Prober(port)
    prober.start()
    try:
        deadline = time.monotonic() + 30
        while not prober.answers and time.monotonic() < deadline:
            time.sleep(0.1)
        assert prober.answers, "the server does not answer through the forwarded port"
        started = time.monotonic()
        g.switch_kernel(argv)
        deadline = time.monotonic() + 300
        while not prober.answered_since(started + 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        prober.done.set()
        prober.join()
    assert prober.answered_since(started + 1), "the server never answered again"
    return prober.longest_gap(), prober.answers[-1][1]


def test_blackout_of_seamless_upgrade_against_systemctl_kexec(boot_guest: BootGuest) -> None:
    """An HTTP server holding state (an enabled unit) is probed from the host every 50 ms
    through a forwarded port: across `seamless upgrade` A→B it keeps its state; across a
    plain `systemctl kexec` B→A systemd restarts it and the state is lost. Both longest
    gaps are recorded."""
    port = free_port()
    g = boot_guest("A", forwards={PORT: port})
    g.run("seamless", "store", "format")
    g.channel.run(["sh", "-c", "cat > /usr/local/lib/web.py"], input=HTTP_STATE.encode(),
                  check=True)
    g.channel.run(["sh", "-c", "cat > /etc/systemd/system/web.service"],
                  input=WEB_UNIT.encode(), check=True)
    g.run("systemctl", "enable", "--now", "web.service")
    wait_http(g, PORT)
    for _ in range(3):
        http(g, PORT, "POST")

    seamless_gap, state = measure(
        g, ["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"], port)
    assert g.run("uname", "-r").strip() == B.release
    assert state == 3, "the upgrade lost the server's state"

    g.run("kexec", "-s", "-l", A.vmlinuz, f"--initrd={A.initrd}", f"--append={g.spec.cmdline()}")
    kexec_gap, state = measure(
        g, ["sh", "-c", "echo entering the old kernel; exec systemctl kexec"], port)
    assert g.run("uname", "-r").strip() == A.release
    assert state == 0, "systemctl kexec should have restarted the server without its state"

    record(f"blackout seen by a client: seamless upgrade (state kept) {seamless_gap:.1f} s",
           seamless_gap)
    record(f"blackout seen by a client: systemctl kexec (state lost) {kexec_gap:.1f} s",
           kexec_gap)
