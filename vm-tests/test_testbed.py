"""The test bed itself: boot each kernel, and keep the reserved region across kexec."""

from __future__ import annotations

import pytest

from vmtest import config, pmem, qemu
from vmtest.qemu import BootGuest

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]


def test_boot_kernel_a_runs_release_a(guest_a: qemu.Guest) -> None:
    """Booted directly with kernel A, the guest reports A's release and the region's memmap."""
    assert guest_a.run("uname", "-r").strip() == A.release
    cmdline = guest_a.run("cat", "/proc/cmdline")
    assert guest_a.spec.memmap in cmdline.split()
    iomem = guest_a.run("cat", "/proc/iomem")
    assert "Persistent Memory (legacy)" in iomem


@pytest.mark.parametrize(
    ("source", "target"), [(A, B), (B, A)], ids=["A-to-B", "B-to-A"]
)
def test_region_survives_kexec_file_load(
    boot_guest: BootGuest, source: config.Kernel, target: config.Kernel
) -> None:
    """64 MiB of random data in /dev/pmem0 read back byte-identical after `kexec -s`."""
    guest = boot_guest(source.label)
    assert guest.run("uname", "-r").strip() == source.release
    before = guest.info
    assert before is not None
    written = pmem.fill_random(guest, 64)

    after = guest.kexec(target)

    assert after.boot_id != before.boot_id
    assert guest.run("uname", "-r").strip() == target.release
    assert guest.spec.memmap in guest.run("cat", "/proc/cmdline").split()
    assert pmem.read_sha256(guest, 64) == written


def test_firmware_reset_reboots_the_same_guest(guest_a: qemu.Guest) -> None:
    """The baseline later compared with kexec: a QEMU reset boots kernel A again."""
    before = guest_a.info
    assert before is not None
    guest_a.run("sync")
    after = guest_a.reset()
    assert after.boot_id != before.boot_id
    assert guest_a.run("uname", "-r").strip() == A.release
