"""The preserved region and the store, with files standing in for /dev/pmem0."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from seamless.errors import ExitCode, SeamlessError
from seamless.memstore import setup, store
from seamless.memstore.records import Header, Manifest
from seamless.memstore.region import (
    Region,
    find_region,
    memformat,
    memparse,
    parse_iomem,
    pmem_ranges,
)

# The guest's /proc/iomem with memmap=256M!1G (abridged).
IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000f0000-000fffff : System ROM
00100000-3fffffff : System RAM
  21000000-21e02fff : Kernel code
  21e03000-2186bfff : Kernel rodata
  21000000-21245bff : Kernel data
  218ab000-21dfffff : Kernel bss
40000000-4fffffff : Persistent Memory (legacy)
  40000000-4fffffff : namespace0.0
50000000-7ffdcfff : System RAM
7ffdd000-7fffffff : Reserved
"""
CMDLINE = "root=/dev/vda rw console=ttyS0 memmap=256M!1G quiet\n"


def test_sizes_read_and_written_like_the_kernel() -> None:
    assert memparse("256M") == 256 << 20
    assert memparse("1g") == 1 << 30
    assert memparse("0x40000000") == 1 << 30
    assert memparse("4096") == 4096
    assert memformat(256 << 20) == "256M" and memformat(1 << 30) == "1G"
    assert memformat(1664 << 20) == "1664M" and memformat(1000) == "1000"
    with pytest.raises(SeamlessError, match="not a size"):
        memparse("lots")


def test_pmem_ranges_of_a_command_line() -> None:
    ranges = pmem_ranges("a memmap=64M$0x100000 memmap=256M!1G,16M!4G b")
    assert [(arg, r.size, r.start) for arg, r in ranges] == [
        ("memmap=256M!1G,16M!4G", 256 << 20, 1 << 30),
        ("memmap=256M!1G,16M!4G", 16 << 20, 4 << 30),
    ]
    assert pmem_ranges("root=/dev/vda memmap=1G$4G") == []


def test_iomem_is_read_as_a_tree() -> None:
    top = parse_iomem(IOMEM)
    assert [r.name for r in top][:4] == ["Reserved", "System RAM", "System ROM", "System RAM"]
    ram = top[3]
    assert (ram.start, ram.end, ram.size) == (0x100000, 0x3FFFFFFF, 0x3FF00000)
    assert [c.name for c in ram.children] == ["Kernel code", "Kernel rodata", "Kernel data",
                                              "Kernel bss"]


def test_the_region_is_found_from_the_command_line_and_iomem() -> None:
    region = find_region(CMDLINE, IOMEM, load=False)
    assert region is not None
    assert (region.start, region.size, region.memmap) == (1 << 30, 256 << 20, "memmap=256M!1G")
    assert region.reserved_now
    # On the command line but not in iomem: configured, not reserved by this kernel.
    other = find_region("memmap=128M!3G", IOMEM, load=False)
    assert other is not None and not other.reserved_now and other.device is None
    assert find_region("root=/dev/vda", IOMEM, load=False) is None
    with pytest.raises(SeamlessError, match="more than one"):
        find_region("memmap=256M!1G memmap=64M!2G", IOMEM, load=False)


def test_setup_chooses_the_highest_aligned_slot_clear_of_the_kernel() -> None:
    plain = IOMEM.replace("40000000-4fffffff : Persistent Memory (legacy)\n"
                          "  40000000-4fffffff : namespace0.0\n50000000-7ffdcfff : System RAM",
                          "40000000-7ffdcfff : System RAM")
    arg = setup.choose_range(256 << 20, parse_iomem(plain))
    assert arg.start % setup.ALIGN == 0 and arg.start >= setup.LOW_LIMIT
    assert arg.start + arg.size <= 0x7FFDD000
    assert arg.text == "memmap=256M!1664M"
    # Only low RAM holding the kernel: a slot must avoid the kernel's ranges.
    low = parse_iomem("00100000-7fffffff : System RAM\n  70000000-70ffffff : Kernel code\n")
    arg = setup.choose_range(256 << 20, low)
    assert arg.start + arg.size <= 0x70000000 and arg.start >= setup.LOW_LIMIT
    with pytest.raises(SeamlessError, match="no 2G range"):
        setup.choose_range(2 << 30, parse_iomem(plain))
    with pytest.raises(SeamlessError, match="shows no addresses"):
        setup.choose_range(64 << 20, parse_iomem("00000000-00000000 : System RAM\n"))


def test_setup_refuses_a_second_region_and_writes_a_grub_dropin(tmp_path: Path) -> None:
    dropin = tmp_path / "grub.d" / "seamless.cfg"
    default = tmp_path / "grub"
    default.write_text('GRUB_CMDLINE_LINUX="quiet"\n')
    assert setup.existing_regions("root=/dev/vda", dropin, default) == []
    assert setup.existing_regions(CMDLINE, dropin, default) == ["memmap=256M!1G"]
    default.write_text('GRUB_CMDLINE_LINUX="memmap=1G!4G"\n')
    assert len(setup.existing_regions("", dropin, default)) == 1
    with pytest.raises(SeamlessError, match="grub is not in use"):
        setup.boot_config(setup.choose_range(64 << 20, parse_iomem(IOMEM)), dropin,
                          tmp_path / "no-update-grub")
    config = setup.boot_config(setup.choose_range(64 << 20, parse_iomem(IOMEM)), dropin,
                               default)
    assert 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX memmap=64M!' in config.text


def test_store_generations_numbering_and_space(tmp_path: Path) -> None:
    s = store.Store(tmp_path)
    (tmp_path / store.GENERATIONS).mkdir()
    with pytest.raises(SeamlessError, match="holds no generation"):
        s.generation()
    n, gen = s.new_generation()
    assert n == 1
    gen.create()
    assert s.partials() == [gen.partial] and s.generations() == []
    gen.seal(Manifest(generation=1))
    n2, gen2 = s.new_generation()
    gen2.create()  # a crashed checkpoint: its number is not reused, it is overwritten
    (gen2.partial / "pages-1.img").write_bytes(b"memory")
    assert n2 == 2 and s.new_generation()[0] == 3 and s.partials() == []
    assert [n for n, _ in s.generations()] == [1]
    assert s.generation()[0] == 1
    with pytest.raises(SeamlessError, match="no generation 5"):
        s.generation(5)
    assert s.fits(1) and not s.fits(1 << 60)
    (tmp_path / store.HEADER).write_bytes(Header(1 << 30, 256 << 20, 256 << 20, "u").to_bytes())
    gen2.create()
    status = s.status()
    assert [g["number"] for g in status["generations"]] == [1]
    assert status["partial"] == [str(gen2.partial)]


def test_geometry_must_match_the_header() -> None:
    header = Header(region_start=1 << 30, region_size=256 << 20, device_size=256 << 20, uuid="u")
    region = Region(start=1 << 30, size=256 << 20, memmap="memmap=256M!1G", reserved_now=True)
    store.check_geometry(header, region, 256 << 20)
    moved = Region(start=2 << 30, size=256 << 20, memmap="memmap=256M!2G", reserved_now=True)
    with pytest.raises(SeamlessError, match="formatted for a region") as e:
        store.check_geometry(header, moved, 256 << 20)
    assert e.value.status == ExitCode.CHECK_FAILED
    assert Header.from_bytes(header.to_bytes()) == header
    with pytest.raises(SeamlessError, match="not a seamless store header"):
        Header.from_bytes(header.to_bytes().replace(b"seamless-store", b"seamless-other"))


def fake_region(path: Path) -> Region:
    return Region(start=1 << 30, size=path.stat().st_size, memmap="memmap=32M!1G",
                  reserved_now=True, device=path)


def test_format_refuses_foreign_data_and_wrong_sizes(tmp_path: Path) -> None:
    if not shutil.which("mkfs.ext2") or not shutil.which("blkid"):
        pytest.fail("e2fsprogs and blkid are needed (dev/bootstrap.sh installs them)")
    dev = tmp_path / "pmem"
    with open(dev, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-L", "precious", dev], check=True)
    before = dev.read_bytes()
    with pytest.raises(SeamlessError, match="not a seamless store .ext2, label 'precious'"):
        store.format_store(dev, fake_region(dev), mountpoint=tmp_path / "mnt")
    wrong = Region(start=1 << 30, size=64 << 20, memmap="m", reserved_now=True, device=dev)
    with pytest.raises(SeamlessError, match="holds 33554432 bytes but the region is 67108864"):
        store.format_store(dev, wrong, mountpoint=tmp_path / "mnt")
    small = tmp_path / "small"
    with open(small, "wb") as f:
        f.truncate(4 << 20)
    with pytest.raises(SeamlessError, match="too small"):
        store.format_store(small, fake_region(small), mountpoint=tmp_path / "mnt")
    assert dev.read_bytes() == before, "a refused format wrote to the device"
    assert not (tmp_path / "mnt").exists()


@pytest.fixture
def loop_store(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        pytest.skip("formatting a file-backed store needs root and loop devices")
    dev, mnt = tmp_path / "pmem", tmp_path / "mnt"
    with open(dev, "wb") as f:
        f.truncate(32 << 20)
    yield dev, mnt
    subprocess.run(["umount", mnt], capture_output=True)


def test_format_write_verify_wipe_on_a_loop_device(loop_store: tuple[Path, Path]) -> None:
    dev, mnt = loop_store
    region = fake_region(dev)
    s = store.format_store(dev, region, mountpoint=mnt)
    assert s.header().region_size == 32 << 20 and not s.header().dax
    assert mnt.stat().st_mode & 0o777 == 0o700
    n, gen = s.new_generation()
    (gen.create() / "secret.img").write_bytes(b"s" * 100_000)
    gen.seal(Manifest(generation=n))
    assert gen.verify() == []
    assert (gen.final / "secret.img").stat().st_mode & 0o777 == 0o600
    # A store on the device is not foreign: formatting it again needs no --force.
    store.unmount(mnt)
    s = store.format_store(dev, region, mountpoint=mnt)
    assert s.generations() == []
    n, gen = s.new_generation()
    (gen.create() / "secret.img").write_bytes(b"s" * 100_000)
    gen.seal(Manifest(generation=n))
    s = store.wipe(s, dev, region)
    assert s.generations() == [] and s.header().region_size == 32 << 20
    store.unmount(mnt)
    assert b"s" * 4096 not in dev.read_bytes(), "wipe left the generation's bytes"


def test_arming_formats_only_a_region_that_holds_no_store(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After a cold boot (garbage): formatted. A store that opens, with a generation
    waiting: left alone. Something that carries the store's label but does not open, or
    another filesystem: left for the operator, exit 4."""
    import json

    from click.testing import CliRunner

    from seamless.cli import cli
    from seamless.memstore import cli as store_cli

    region = Region(start=1 << 30, size=256 << 20, memmap="memmap=256M!1G",
                    reserved_now=True, device=tmp_path / "pmem0")
    formatted: list[Path] = []
    opens: list[bool] = [False]
    label: list[tuple[str | None, str | None]] = [(None, None)]

    def open_store(r: Region) -> store.Store:
        if not opens[0]:
            raise SeamlessError(f"{r.device} is not a seamless store")
        s = store.Store(tmp_path / "store")
        (s.root / store.GENERATIONS / "gen-4").mkdir(parents=True, exist_ok=True)
        (s.root / store.GENERATIONS / "gen-4" / "manifest").write_bytes(b"")
        return s

    monkeypatch.setattr(store_cli, "find_region", lambda: region)
    monkeypatch.setattr(store_cli, "open_store", open_store)
    monkeypatch.setattr(store_cli, "signature", lambda device: label[0])
    monkeypatch.setattr(store_cli, "format_store",
                        lambda device, r: formatted.append(device))
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    def arm() -> tuple[int, dict[str, object]]:
        result = CliRunner().invoke(cli, ["store", "arm", "--json"])
        return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else {}

    assert arm() == (0, {"armed": True, "formatted": True, "generations": []})
    assert formatted == [region.device]
    opens[0] = True
    assert arm() == (0, {"armed": True, "formatted": False, "generations": [4]})
    assert formatted == [region.device]  # a pending generation is never touched
    opens[0] = False
    for found in (("ext4", "seamless-store"), ("xfs", None)):
        label[0] = found
        result = CliRunner().invoke(cli, ["store", "arm"], standalone_mode=False)
        assert isinstance(result.exception, SeamlessError), result.output
        assert result.exception.status == 4 and "nothing was changed" in (
            result.exception.hint or "")
    assert formatted == [region.device]


def test_setup_undo_gives_the_region_back(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    from click.testing import CliRunner

    from seamless.cli import cli
    from seamless.memstore import cli as store_cli

    dropin = tmp_path / "grub.d" / "seamless.cfg"
    update = tmp_path / "update-grub"
    update.write_text("#!/bin/sh\n")
    monkeypatch.setattr(setup, "GRUB_DROPIN", dropin)
    monkeypatch.setattr(setup, "UPDATE_GRUB", update)
    ran: list[list[str]] = []
    monkeypatch.setattr(store_cli, "run", lambda argv, **kw: ran.append(argv))
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    missing = CliRunner().invoke(cli, ["setup", "--undo"], standalone_mode=False)
    assert isinstance(missing.exception, SeamlessError) and ran == []
    dropin.parent.mkdir()
    dropin.write_text('GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX memmap=1G!4G"\n')
    dry = CliRunner().invoke(cli, ["setup", "--undo", "--dry-run"])
    assert dry.exit_code == 0 and dropin.exists() and ran == []
    done = CliRunner().invoke(cli, ["setup", "--undo"])
    assert done.exit_code == 0, done.output
    assert not dropin.exists() and ran == [[str(update)]]
    usage = CliRunner().invoke(cli, ["setup"])
    assert usage.exit_code == 2 and "--region SIZE" in usage.output
