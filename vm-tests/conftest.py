"""pytest fixtures for QEMU tests: the image, and guests booted from it.

Without the prerequisites (qemu, mmdebstrap, root) the VM tests skip with the
reason, except under CI=true, where a missing prerequisite fails them: a VM test
that did not run is not a pass.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmtest import image, qemu  # noqa: E402
from vmtest.log import TIMINGS_FILE, recorded  # noqa: E402

BootGuest = qemu.BootGuest


def missing_prerequisites() -> list[str]:
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in (
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("qemu-img", "qemu-utils"),
            ("mmdebstrap", "mmdebstrap"),
            ("mkfs.ext4", "e2fsprogs"),
        )
        if shutil.which(tool) is None
    ]
    if os.geteuid() != 0:
        missing.append("root (the image is built with mmdebstrap --mode=root and chroot)")
    return missing


def _require_prerequisites() -> None:
    missing = missing_prerequisites()
    if missing:
        reason = "VM tests need: " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: a skipped VM test is not a pass)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def vm_image() -> image.Image:
    _require_prerequisites()
    return image.build()


@pytest.fixture(scope="session")
def stock_image() -> image.Image:
    """A stock Debian server: the distribution's packaged services, enabled as apt does."""
    _require_prerequisites()
    return image.build(stock=True)


def _booting(img: image.Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootGuest]:
    """Boot guests of ``img`` for one test; stop them all after it. Each is resumed from
    the booted snapshot of its kind when an earlier test saved one (see
    :data:`qemu.SNAPSHOTS`)."""
    guests: list[qemu.Guest] = []

    def boot(kernel: str = "A", **kwargs: object) -> qemu.Guest:
        spec = qemu.GuestSpec(image=str(img.directory), kernel=kernel, **kwargs)  # type: ignore[arg-type]
        run_dir = tmp_path_factory.mktemp(f"guest-{kernel}")
        guest = qemu.boot(img, spec, run_dir, snapshot=True)
        guests.append(guest)
        return guest

    yield boot
    for guest in guests:
        guest.stop()


@pytest.fixture
def boot_guest(
    vm_image: image.Image, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootGuest]:
    """Boot guests for one test: ``boot_guest(kernel="A", memory=..., region=...)``."""
    yield from _booting(vm_image, tmp_path_factory)


@pytest.fixture
def boot_stock(
    stock_image: image.Image, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootGuest]:
    """Boot stock-server guests for one test (see :func:`stock_image`)."""
    yield from _booting(stock_image, tmp_path_factory)


@pytest.fixture
def guest_a(boot_guest: BootGuest) -> qemu.Guest:
    return boot_guest("A")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long VM tests first: with two at a time (pytest -n 2), the run ends when its
    last test does, and a long one started last made it end minutes after the other
    worker was done."""
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return float(mark.args[0]) if mark else 0.0

    items.sort(key=seconds, reverse=True)


def pytest_configure(config: pytest.Config) -> None:
    """The controller names the file the workers' timings go to (pytest -n N)."""
    if not hasattr(config, "workerinput") and TIMINGS_FILE not in os.environ:
        fd, path = tempfile.mkstemp(prefix="seamless-vm-timings-", suffix=".jsonl")
        os.close(fd)
        os.environ[TIMINGS_FILE] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        path = os.environ.pop(TIMINGS_FILE, None)
        if path and Path(path).name.startswith("seamless-vm-timings-"):
            Path(path).unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = recorded()
    if rows:
        terminalreporter.section("test-bed phase timings")
        for phase, seconds in rows:
            terminalreporter.write_line(f"{phase:<60} {seconds:7.1f} s")

