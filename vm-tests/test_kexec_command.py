"""`seamless kexec`: bad input loads nothing; A→B→A keeps the store; kexec versus reset."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]

WRITE_GENERATION = (
    "import os\n"
    "from seamless.memstore.records import Manifest\n"
    "from seamless.memstore.store import open_store\n"
    "store = open_store()\n"
    "n, gen = store.new_generation()\n"
    "(gen.create() / 'data.img').write_bytes(os.urandom(16 << 20))\n"
    "gen.seal(Manifest(generation=n))\n"
    "print(n)\n"
)


def loaded(guest: qemu.Guest) -> bool:
    return guest.run("cat", "/sys/kernel/kexec_loaded").strip() == "1"


def refused(guest: qemu.Guest, *args: str) -> str:
    result = guest.channel.run(["seamless", "kexec", "--yes", *args])
    assert result.returncode == 1, (args, result.returncode, result.stderr)
    assert not loaded(guest), f"{args} left a kernel loaded"
    return result.stderr.decode(errors="replace")


def verify_store(guest: qemu.Guest) -> dict[str, object]:
    result = guest.channel.run(["seamless", "store", "verify", "--json"])
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


def test_seamless_kexec_a_to_b_and_back_keeps_the_store(boot_guest: BootGuest) -> None:
    """Bad kernels and a command line without the region are refused with nothing loaded;
    --dry-run loads and unloads; kexec A→B then B→A: each time the release is the
    target's and the store's generation verifies. Then a firmware reset for comparison."""
    g = boot_guest("A")
    assert g.run("python3", "-c", WRITE_GENERATION).strip() == "1"

    refused(g, "--kernel", "/etc/hostname")
    refused(g, "--kernel", "/boot/nothing-here")
    refused(g, "--kernel", B.vmlinuz, "--initrd", "/boot/no-initrd")
    assert "memmap=256M!1G" in refused(g, "--kernel", B.vmlinuz, "--cmdline",
                                       "root=/dev/vda rw console=ttyS0,115200")
    dry = g.channel.run(["seamless", "kexec", "--kernel", B.vmlinuz, "--dry-run", "--json"])
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["release"] == B.release and plan["initrd"] == B.initrd
    assert g.spec.memmap in plan["cmdline"].split()
    assert not loaded(g)

    kexec_seconds = []
    for source, target in ((A, B), (B, A)):
        assert g.run("uname", "-r").strip() == source.release
        _, seconds = g.seamless_kexec(target)
        kexec_seconds.append(seconds)
        assert g.run("uname", "-r").strip() == target.release
        assert g.spec.memmap in g.run("cat", "/proc/cmdline").split()
        assert verify_store(g)["ok"]

    start = time.monotonic()
    g.reset()
    reset_seconds = time.monotonic() - start
    record(f"kexec vs firmware reboot: {min(kexec_seconds):.1f} s vs {reset_seconds:.1f} s "
           f"({reset_seconds / min(kexec_seconds):.1f}x)", reset_seconds)
