"""The preserved RAM region: ``memmap=SIZE!START`` on the kernel command line.

The kernel turns that range of System RAM into legacy persistent memory
("Persistent Memory (legacy)" in /proc/iomem), which the nd_e820 and nd_pmem
drivers offer as /dev/pmemN.  The old kernel does not tell the new one about
it: the same argument must be on both command lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seamless import kernel_modules
from seamless.errors import SeamlessError
from seamless.log import log
from seamless.run import CommandError, run

PMEM_MODULES = kernel_modules.named("store")
LEGACY_PMEM = "Persistent Memory (legacy)"

_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def memparse(text: str) -> int:
    """A size or address as the kernel reads it: ``256M``, ``1G``, ``0x40000000``."""
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([kKmMgGtTpPeE]?)", text.strip())
    if not m:
        raise SeamlessError(f"not a size: {text!r}", hint="write it like 256M, 4G or 0x10000000")
    return int(m.group(1), 0) << _UNITS[m.group(2).upper()]


def memformat(value: int) -> str:
    """The shortest exact way to write ``value``: 268435456 -> ``256M``."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        shift = _UNITS[unit]
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return str(value)


@dataclass(frozen=True)
class MemmapArg:
    """One ``SIZE!START`` range of a ``memmap=`` argument."""

    size: int
    start: int

    @property
    def text(self) -> str:
        return f"memmap={memformat(self.size)}!{memformat(self.start)}"


def pmem_ranges(cmdline: str) -> list[tuple[str, MemmapArg]]:
    """Every ``SIZE!START`` range of the command line's ``memmap=`` arguments, with
    the argument it came from (one argument can hold several, comma separated)."""
    found = []
    for arg in cmdline.split():
        if not arg.startswith("memmap="):
            continue
        for part in arg.removeprefix("memmap=").split(","):
            if "!" in part:
                size, start = part.split("!", 1)
                found.append((arg, MemmapArg(memparse(size), memparse(start))))
    return found


@dataclass
class IomemRange:
    start: int
    end: int  # inclusive, as /proc/iomem writes it
    name: str
    children: list[IomemRange] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def parse_iomem(text: str) -> list[IomemRange]:
    """/proc/iomem as a tree (top-level ranges with their nested children)."""
    top: list[IomemRange] = []
    stack: list[tuple[int, IomemRange]] = []
    for line in text.splitlines():
        m = re.match(r"^( *)([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$", line)
        if not m:
            continue
        depth = len(m.group(1))
        r = IomemRange(int(m.group(2), 16), int(m.group(3), 16), m.group(4).strip())
        while stack and stack[-1][0] >= depth:
            stack.pop()
        (stack[-1][1].children if stack else top).append(r)
        stack.append((depth, r))
    return top


@dataclass
class Region:
    """The preserved region as the running system sees it."""

    start: int
    size: int
    #: The exact argument that reserves it (what a new command line must carry).
    memmap: str
    #: The running kernel reserves it: in /proc/cmdline and /proc/iomem.
    reserved_now: bool
    device: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "size": self.size,
            "memmap": self.memmap,
            "reserved_now": self.reserved_now,
            "device": str(self.device) if self.device else None,
        }


def _ancestor_attrs(sys_path: Path) -> tuple[int, int] | None:
    """The physical start and size of the nd region a pmem block device belongs to."""
    for parent in sys_path.resolve().parents:
        resource, size = parent / "resource", parent / "size"
        if parent.name.startswith("region") and resource.is_file() and size.is_file():
            try:
                return int(resource.read_text(), 0), int(size.read_text(), 0)
            except (OSError, ValueError):
                return None
    return None


def pmem_devices(sys_block: Path = Path("/sys/block")) -> dict[tuple[int, int], Path]:
    """Every pmem block device, by (start, size) of its region."""
    found = {}
    names: Iterable[str]
    try:
        import pyudev

        context = pyudev.Context()
        names = [d.sys_name for d in context.list_devices(subsystem="block", DEVTYPE="disk")
                 if d.sys_name.startswith("pmem")]
    except ImportError:  # pragma: no cover - pyudev is a dependency
        names = [p.name for p in sys_block.glob("pmem*")]
    for name in names:
        geometry = _ancestor_attrs(sys_block / name / "device")
        if geometry:
            found[geometry] = Path("/dev") / name
    return found


def load_drivers() -> None:
    try:
        run(["modprobe", "-a", *PMEM_MODULES])
        run(["udevadm", "settle", "--timeout=10"], check=False)
    except CommandError as e:
        log.warning("loading the pmem drivers failed: %s", e)


def find_region(
    cmdline: str | None = None,
    iomem: str | None = None,
    *,
    load: bool = True,
) -> Region | None:
    """The preserved region of the running system, or None when there is none.

    Loads the pmem drivers when the region is reserved but has no device yet
    (``load=False`` only looks)."""
    if cmdline is None:
        cmdline = Path("/proc/cmdline").read_text()
    if iomem is None:
        iomem = Path("/proc/iomem").read_text()
    ranges = pmem_ranges(cmdline)
    if len(ranges) > 1:
        raise SeamlessError(
            "the command line reserves more than one memmap=SIZE!START region: "
            + " ".join(arg for arg, _ in ranges),
            hint="keep one region (KASLR honours few memmap= ranges); seamless uses one")
    legacy = [r for r in _walk(parse_iomem(iomem)) if r.name == LEGACY_PMEM]
    if not ranges:
        if legacy:
            log.debug("legacy pmem without memmap= on the command line: %s", legacy)
        return None
    arg, memmap = ranges[0]
    in_iomem = any(r.start == memmap.start and r.size == memmap.size for r in legacy)
    if in_iomem and all(r.start == 0 for r in legacy):
        in_iomem = memmap.start == 0  # /proc/iomem shows zeros to non-root readers
    region = Region(start=memmap.start, size=memmap.size, memmap=arg, reserved_now=in_iomem)
    if in_iomem:
        devices = pmem_devices()
        if (memmap.start, memmap.size) not in devices and load:
            load_drivers()
            devices = pmem_devices()
        region.device = devices.get((memmap.start, memmap.size))
    return region


def _walk(ranges: list[IomemRange]) -> Iterable[IomemRange]:
    for r in ranges:
        yield r
        yield from _walk(r.children)
