"""`seamless upgrade --lazy-pages`: the trees run in B before their memory is back; CRIU's
lazy-pages daemon brings it back while they run, and then the generation is wiped."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import config
from vmtest.log import record
from vmtest.qemu import BootGuest, Guest
from vmtest.workloads import (
    BIG_MEMORY,
    PORT,
    http,
    main_pid,
    memory_report,
    start_service,
    start_web_unit,
)

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]
REGION = "512M!1G"


def settled_status(g: Guest, within: float = 300) -> dict[str, object]:
    """`seamless status` once the lazily restored memory is all back (or not)."""
    deadline = time.monotonic() + within
    while True:
        status: dict[str, object] = json.loads(g.run("seamless", "status", "--json",
                                                     check=False))
        if status.get("memory") != "arriving" or time.monotonic() > deadline:
            return status
        time.sleep(1)


def test_a_lazy_restore_brings_the_memory_back_while_the_trees_run(
    boot_guest: BootGuest,
) -> None:
    """A process holding 256 MiB and an HTTP server (a unit file) are upgraded to B with
    --lazy-pages, restored in B's initramfs-tools initramfs: both run with the same PIDs,
    the 256 MiB are identical, the report says the memory is all back, the daemons are
    gone and the generation was wiped after that."""
    g = boot_guest("A", region=REGION)
    big = start_service(g, "big", "python3", "-c", BIG_MEMORY, "/root/big.sum")
    g.sh("for i in $(seq 300); do test -s /root/big.sum && exit 0; sleep 0.2; done; exit 1")
    memory = memory_report(g, big)
    web = start_web_unit(g)
    for _ in range(2):
        http(g, PORT, "POST")

    g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--initrd",
                     B.initramfs_tools_initrd, "--lazy-pages", "--yes"])

    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    assert http(g, PORT) == 2 and main_pid(g, "web") == web
    status = settled_status(g)
    assert status["ok"] and status["memory"] == "back" and status["wiped"], status
    assert status["stage"] == "initramfs", status
    trees = status["trees"]
    assert isinstance(trees, list) and all(t["lazy"] for t in trees), trees
    assert memory_report(g, big) == memory  # same PID, same 256 MiB
    assert g.run("pgrep", "-c", "-f", "criu lazy-pages", check=False).strip() == "0"
    phases = status["phases"]
    assert isinstance(phases, dict)
    for name, value in phases.items():
        record(f"lazy restore phase: {name}", value)
