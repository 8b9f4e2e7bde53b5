"""The reserved region in the guest: fill it, and read it back after a kexec."""

from __future__ import annotations

from vmtest.qemu import Guest

PMEM_MODULES = ("libnvdimm", "nd_btt", "nd_pmem", "nd_e820")


def device(guest: Guest) -> str:
    """Load the legacy pmem drivers and return the region's block device."""
    guest.run("modprobe", "-a", *PMEM_MODULES)
    guest.sh("udevadm settle -t 10 || true; test -b /dev/pmem0")
    return "/dev/pmem0"


def fill_random(guest: Guest, mib: int) -> str:
    """Write ``mib`` MiB of random data at the start of the region; returns its sha256."""
    dev = device(guest)
    size = int(guest.run("blockdev", "--getsize64", dev))
    if size < mib << 20:
        raise AssertionError(f"{dev} holds {size >> 20} MiB, less than {mib} MiB")
    out = guest.sh(
        f"head -c {mib << 20} /dev/urandom > /run/pmem.data && "
        f"dd if=/run/pmem.data of={dev} bs=1M oflag=direct status=none && "
        f"sha256sum < /run/pmem.data && rm /run/pmem.data"
    )
    return out.split()[0]


def read_sha256(guest: Guest, mib: int) -> str:
    dev = device(guest)
    out = guest.sh(f"dd if={dev} bs=1M count={mib} iflag=direct status=none | sha256sum")
    return out.split()[0]
