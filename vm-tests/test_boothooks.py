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
    """The image was made as an operator would (seamless install-restorer, then the
    kernels' initramfs built): B's initramfs carries the hook; kexec into B with
    seamless.restore= runs it before switch_root, chrooted into the real root, and
    when the restore fails the guest still reaches multi-user."""
    out = json.loads(guest_a.run("seamless", "install-restorer", "--json"))
    assert out["dracut"] == "/usr/lib/dracut/modules.d/90seamless"
    assert "seamless" in guest_a.run("cat", "/etc/dracut.conf.d/90-seamless.conf")
    listing = guest_a.run("lsinitrd", B.initrd)
    assert "usr/lib/seamless/seamless-lib.sh" in listing
    assert "pre-pivot/90-seamless-restore.sh" in listing
    assert "nd_pmem.ko" in listing

    guest_a.kexec(B, append=guest_a.spec.cmdline() + " seamless.restore=1")

    assert guest_a.run("uname", "-r").strip() == B.release
    kernel_log = guest_a.run("dmesg")
    assert "seamless: restoring generation 1" in kernel_log
    # There is nothing to restore in this guest: the restore fails, the boot goes on.
    assert "seamless: restore finished with exit code" in kernel_log
    state = guest_a.channel.run(["systemctl", "is-system-running", "--wait"], timeout=300)
    assert state.out.strip() in ("running", "degraded"), state.out
