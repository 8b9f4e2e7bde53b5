"""The boot-time restorer in a real initramfs: installed, included, run at boot."""

from __future__ import annotations

import json

import pytest

from vmtest import config, qemu

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]


def test_restorer_is_built_in_and_a_failing_restore_does_not_stop_the_boot(
    guest_a: qemu.Guest,
) -> None:
    """dracut's path. The image was made as an operator would (apt installs the package, whose hooks
    every initramfs built then carries; `seamless install-restorer` finds them the
    package's and copies nothing): B's initramfs carries the hook; kexec into B with
    seamless.restore= keeps the PIDs below seamless.last_pid= free from the cmdline
    stage on, leaves the restore to seamless-restore.service (systemd runs this
    initramfs), which fails without a generation in the store: the guest still reaches multi-user
    and seamless status says why."""
    out = json.loads(guest_a.run("seamless", "install-restorer", "--json"))
    assert out["dracut"] == "/usr/lib/dracut/modules.d/90seamless"
    assert "seamless" in guest_a.run("cat", "/usr/lib/dracut/dracut.conf.d/90-seamless.conf")
    assert guest_a.run("dpkg-query", "-S", "/usr/lib/dracut/modules.d/90seamless").startswith(
        "seamless:")
    listing = guest_a.run("lsinitrd", B.dracut_initrd)
    assert "usr/lib/seamless/seamless-lib.sh" in listing
    assert "usr/lib/seamless/kernel-modules" in listing
    assert "pre-pivot/90-seamless-restore.sh" in listing
    assert "nd_pmem.ko" in listing

    assert "cmdline/01-seamless-pids.sh" in listing
    assert guest_a.run("systemctl", "is-enabled", "seamless-restore.service").strip() == "enabled"

    guest_a.kexec(B, append=guest_a.spec.cmdline() + " seamless.restore=1 seamless.last_pid=5000",
                  initrd=B.dracut_initrd)

    assert guest_a.run("uname", "-r").strip() == B.release
    kernel_log = guest_a.run("dmesg")
    assert "seamless: PIDs up to 5000 kept free" in kernel_log
    # systemd runs the initramfs: the restore is left to the real root's unit.
    assert "seamless: generation 1 is restored by seamless-restore.service" in kernel_log
    # The agent started after the reservation: its PID is above it.
    assert int(guest_a.run("sh", "-c", "echo $PPID")) > 5000
    # The store holds no generation: the restore fails, the boot goes on, and says so.
    state = guest_a.settled()
    assert state in ("running", "degraded"), state
    assert guest_a.run("systemctl", "is-failed", "seamless-restore.service",
                       check=False).strip() == "failed"
    status = guest_a.channel.run(["seamless", "status", "--json"])
    report = json.loads(status.stdout)
    assert not report["ok"] and "store" in report["error"], report
