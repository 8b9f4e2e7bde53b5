"""The Debian package as an operator meets it: apt installed it (the image is built
so), and `apt purge` takes all of it away, processes and boot untouched."""

from __future__ import annotations

import time

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import main_pid, read_counter, start_counter

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]

#: What the package installs or seamless writes, each of which purge must take away.
OWNED = (
    "/usr/bin/seamless", "/etc/seamless", "/var/lib/seamless",
    "/usr/lib/dracut/modules.d/90seamless", "/usr/lib/dracut/dracut.conf.d/90-seamless.conf",
    "/usr/share/initramfs-tools/hooks/seamless", "/usr/share/seamless",
    "/etc/kernel/postinst.d/zz-seamless", "/lib/udev/rules.d/60-seamless-pmem.rules",
    "/lib/systemd/system/seamless-restore.service", "/lib/systemd/system/seamless-arm.service",
    "/usr/share/man/man8/seamless.8.gz", "/usr/share/bash-completion/completions/seamless",
)


def existing(g: qemu.Guest) -> set[str]:
    """Which of :data:`OWNED` exist in the guest."""
    out = g.sh("for p in " + " ".join(OWNED) + "; do test -e $p && echo $p; done || true")
    return set(out.split())


@pytest.mark.long(320)
def test_apt_purge_keeps_the_processes_and_leaves_a_boot_without_seamless(
    boot_guest: BootGuest,
) -> None:
    """As apt installed it: its units enabled, its man page and completion there, the
    store made at the cold boot. `apt-get purge seamless` leaves a running service as it
    was, removes every file seamless installed or wrote, rebuilds the newest kernel's
    initramfs through dracut's trigger without the restorer, and that kernel boots from
    it without the region and with no trace of seamless in its log."""
    g = boot_guest("A")
    assert g.run("dpkg-query", "-W", "-f", "${Status}", "seamless") == "install ok installed"
    for unit in ("seamless-arm.service", "seamless-restore.service", "seamless-expire.timer"):
        assert g.run("systemctl", "is-enabled", unit).strip() == "enabled", unit
    present = existing(g)
    assert set(OWNED) - present <= {"/var/lib/seamless"}, present
    pid = start_counter(g, "counter", "/root/count")

    start = time.monotonic()
    purge = g.channel.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y",
                           "-q", "seamless"], timeout=900, check=True)
    out = purge.out + purge.stderr.decode(errors="replace")  # dracut says it on stderr
    record("apt-get purge seamless (dracut rebuilds B's initramfs)", time.monotonic() - start)

    assert f"Generating /boot/initrd.img-{B.release}" in out, out
    left = existing(g)
    assert left == set(), f"left after purge: {left}"
    units = g.run("systemctl", "list-unit-files", "--no-legend", "seamless*", check=False)
    # the test bed's own agent (seamless-vm-agent.service) is not the package's
    assert [u for u in units.split("\n") if u and not u.startswith("seamless-vm-")] == [], units
    assert main_pid(g, "counter.service") == pid
    before = read_counter(g, "/root/count")
    g.sh(f"for i in $(seq 50); do test $(cat /root/count) -gt {before} && exit 0;"
         " sleep 0.1; done; exit 1")
    listing = g.run("lsinitrd", B.initrd)
    assert "seamless-lib.sh" not in listing and "90-seamless-restore.sh" not in listing

    # The region's memmap= goes with the package (seamless setup's grub drop-in: purged);
    # B boots from its rebuilt initramfs without it.
    cmdline = " ".join(a for a in g.spec.cmdline().split() if not a.startswith("memmap="))
    info = g.kexec(B, append=cmdline)
    assert info.release == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    assert g.sh("test -e /dev/pmem0 && echo pmem || true").strip() == ""
    assert "seamless:" not in g.run("dmesg")
