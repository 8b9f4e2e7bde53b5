"""The reboot after a dist-upgrade: a server upgraded from Debian 12 to 13 with apt still
runs Debian 12's kernel (6.1) under 13's userspace; `seamless upgrade` takes it into
13's kernel line (6.12) with its processes.

The guest is Debian 13's image booted on Debian 12's kernel (O), not a dist-upgrade
run in the test: the userspace after `apt full-upgrade` is 13's, and a real
dist-upgrade would take longer under TCG than the rest of a CI run allows.
"""

from __future__ import annotations

import json

import pytest

from vmtest import config
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import PORT, http, main_pid, read_counter, start_counter, start_web_unit

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif("O" not in config.KERNELS,
                       reason=f"Debian {config.RELEASE.version} has no earlier release's "
                              "kernel in the test bed (the dist-upgrade is 12 to 13)"),
]

B = config.KERNELS["B"]


def test_a_dist_upgraded_server_moves_from_12s_kernel_to_13s_with_its_processes(
    boot_guest: BootGuest,
) -> None:
    """A service with state (its own unit, enabled) and a counter run on 6.1 under
    Debian 13; after `seamless upgrade` to 6.12 each has its PID and its state."""
    old = config.KERNELS["O"]
    g = boot_guest("O")
    assert g.run("uname", "-r").strip() == old.release
    assert g.run("sh", "-c", ". /etc/os-release; echo $VERSION_ID").strip() == "13"
    web = start_web_unit(g)
    counter = start_counter(g, "counter", "/root/count")
    for _ in range(2):
        http(g, PORT, "POST")

    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"])

    assert g.run("uname", "-r").strip() == B.release
    # the agent answers before seamless-restore.service is done (dracut): wait for the boot
    state = g.settled()
    assert state in ("running", "degraded"), g.run("seamless", "status", check=False)
    assert main_pid(g, "web.service") == web and main_pid(g, "counter.service") == counter
    assert http(g, PORT) == 2
    before = read_counter(g, "/root/count")
    g.sh(f"for i in $(seq 50); do test $(cat /root/count) -gt {before} && exit 0;"
         " sleep 0.1; done; exit 1")
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"] and status["from"] == old.release and status["to"] == B.release
    record(f"dist-upgrade {old.release} -> {B.release}: reboot call to agent ready", seconds)
