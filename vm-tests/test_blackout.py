"""The blackout a client sees: seamless upgrade against systemctl kexec (state lost)."""

from __future__ import annotations

import json

import pytest

from vmtest import config
from vmtest.log import record
from vmtest.probe import free_port, measure_blackout
from vmtest.qemu import BootGuest
from vmtest.workloads import PORT, http, start_web_unit

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]


def test_blackout_of_seamless_upgrade_against_systemctl_kexec(boot_guest: BootGuest) -> None:
    """An HTTP server holding state (an enabled unit) is probed from the host every 50 ms
    through a forwarded port: across `seamless upgrade` A→B it keeps its state; across a
    plain `systemctl kexec` B→A systemd restarts it and the state is lost. Both longest
    gaps are recorded."""
    port = free_port()
    g = boot_guest("A", forwards={PORT: port})
    start_web_unit(g)
    for _ in range(3):
        http(g, PORT, "POST")

    seamless = measure_blackout(
        port, lambda: g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"]))
    assert g.run("uname", "-r").strip() == B.release
    assert seamless.last_answer == 3, "the upgrade lost the server's state"
    # The store had room: the server's memory was pre-dumped while it ran. The restore
    # unit (dracut: after switch-root) finishes its report once the boot is up.
    g.settled()
    status = json.loads(g.run("seamless", "status", "--json"))
    assert "pre-dump and hash (running)" in status["phases"], status["phases"]

    g.run("kexec", "-s", "-l", A.vmlinuz, f"--initrd={A.initrd}", f"--append={g.spec.cmdline()}")
    kexec = measure_blackout(
        port, lambda: g.switch_kernel(
            ["sh", "-c", "echo entering the old kernel; exec systemctl kexec"]))
    assert g.run("uname", "-r").strip() == A.release
    assert kexec.last_answer == 0, "systemctl kexec should have restarted the server empty"

    record(f"blackout seen by a client: seamless upgrade (state kept), from "
           f"{seamless.began:.1f} s after the command", seamless.seconds)
    record("blackout seen by a client: systemctl kexec (state lost)", kexec.seconds)
