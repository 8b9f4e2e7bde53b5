"""``seamless setup --region SIZE``: choose a range of RAM and reserve it at the next boot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seamless.errors import SeamlessError
from seamless.memstore.region import IomemRange, MemmapArg, memformat, pmem_ranges

#: Regions start on a memory-section boundary (128 MiB on x86_64).
ALIGN = 128 << 20
#: Keep out of low memory (DMA zones, firmware, the usual kernel load address).
LOW_LIMIT = 1 << 30
KERNEL_PARTS = ("Kernel code", "Kernel rodata", "Kernel data", "Kernel bss", "Crash kernel")

GRUB_DROPIN = Path("/etc/default/grub.d/seamless.cfg")
GRUB_DEFAULT = Path("/etc/default/grub")
UPDATE_GRUB = Path("/usr/sbin/update-grub")


def _busy(ram: IomemRange) -> list[tuple[int, int]]:
    return [(c.start, c.end) for c in ram.children if c.name in KERNEL_PARTS]


def choose_range(size: int, iomem: list[IomemRange]) -> MemmapArg:
    """The highest aligned slot of ``size`` bytes inside System RAM, above low memory
    and clear of the kernel's own ranges."""
    if size <= 0 or size % (1 << 20):
        raise SeamlessError(f"a region must be a whole number of MiB, not {size} bytes")
    if all(r.start == 0 and r.end == 0 for r in iomem):
        raise SeamlessError("/proc/iomem shows no addresses", hint="run it as root")
    largest = 0
    for ram in sorted((r for r in iomem if r.name == "System RAM"),
                      key=lambda r: r.start, reverse=True):
        largest = max(largest, ram.size)
        top = ram.end + 1
        while True:
            start = (top - size) // ALIGN * ALIGN
            if start < max(ram.start, LOW_LIMIT):
                break
            clash = [b for b in _busy(ram) if b[0] < start + size and b[1] >= start]
            if not clash:
                return MemmapArg(size=size, start=start)
            top = min(b[0] for b in clash)
    raise SeamlessError(
        f"no {memformat(size)} range of RAM above {memformat(LOW_LIMIT)} is free of the kernel "
        f"(the largest RAM range is {largest >> 20} MiB)",
        hint="choose a smaller --region")


@dataclass
class BootConfig:
    """Where the argument goes and what runs after."""

    path: Path
    text: str
    then: list[str]


def grub_dropin(arg: MemmapArg) -> str:
    return (
        "# Written by `seamless setup`: the RAM region that keeps checkpoints across a\n"
        "# kernel upgrade (kexec). Remove this file and run update-grub to give it back.\n"
        f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {arg.text}"\n'
    )


def existing_regions(cmdline: str, dropin: Path = GRUB_DROPIN,
                     grub_default: Path = GRUB_DEFAULT) -> list[str]:
    """Regions already reserved now, or configured for the next boot."""
    found = [arg for arg, _ in pmem_ranges(cmdline)]
    if dropin.exists():
        found.append(f"{dropin} (configured for the next boot)")
    if grub_default.exists():
        for line in grub_default.read_text().splitlines():
            if line.lstrip().startswith("GRUB_CMDLINE_LINUX") and pmem_ranges(
                line.split("=", 1)[1].strip("\"'")
            ):
                found.append(f"{grub_default}: {line.strip()}")
    return found


def boot_config(arg: MemmapArg, dropin: Path = GRUB_DROPIN,
                update_grub: Path = UPDATE_GRUB) -> BootConfig:
    if not update_grub.exists():
        raise SeamlessError(
            "grub is not in use here, and seamless only knows how to configure grub",
            hint=f"add {arg.text} to your boot loader's kernel command line and reboot")
    return BootConfig(path=dropin, text=grub_dropin(arg), then=[str(update_grub)])
