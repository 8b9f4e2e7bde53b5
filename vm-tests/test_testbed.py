"""The test bed itself: a guest boots kernel A with the region reserved."""

from __future__ import annotations

import pytest

from vmtest import config, qemu

pytestmark = pytest.mark.vm

A = config.KERNELS["A"]


def test_boot_kernel_a_runs_release_a(guest_a: qemu.Guest) -> None:
    """Booted directly with kernel A, the guest reports A's release and the region's memmap."""
    assert guest_a.run("uname", "-r").strip() == A.release
    cmdline = guest_a.run("cat", "/proc/cmdline")
    assert guest_a.spec.memmap in cmdline.split()
    iomem = guest_a.run("cat", "/proc/iomem")
    assert "Persistent Memory (legacy)" in iomem


# kexec A→B and B→A with the region (and its store) kept, and the firmware reset
# compared with it, are in test_kexec_command.py and test_store.py.
