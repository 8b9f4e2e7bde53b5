"""What goes into the guest, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vmtest.errors import VMError


@dataclass(frozen=True)
class Kernel:
    label: str  # "A", "B" or "O"
    package: str  # the Debian package that carries it
    release: str  # `uname -r` once it runs
    suite: str = ""  # the codename it comes from when not the guest's own release

    @property
    def vmlinuz(self) -> str:
        return f"/boot/vmlinuz-{self.release}"

    @property
    def initrd(self) -> str:
        return f"/boot/initrd.img-{self.release}"

    @property
    def initramfs_tools_initrd(self) -> str:
        """The same kernel's initramfs built by initramfs-tools (the image has both)."""
        return f"/boot/initrd.img-{self.release}.initramfs-tools"

    @property
    def dracut_initrd(self) -> str:
        """dracut's initramfs, where :attr:`initrd` is initramfs-tools' (see
        :func:`itools_default`)."""
        return f"/boot/initrd.img-{self.release}.dracut"


def _kernel(label: str, abi: str, suite: str = "") -> Kernel:
    release = f"{abi}-cloud-amd64"
    return Kernel(label=label, package=f"linux-image-{release}", release=release, suite=suite)


@dataclass(frozen=True)
class Release:
    """A Debian release the test bed builds a guest of, and the kernels it walks."""

    version: str  # "13"
    codename: str  # "trixie"
    criu: str  # the version of its CRIU package, as `criu --version` begins it
    #: The upgrade path the tests walk: A is the running kernel, B the target; O, where
    #: there is one, the previous release's kernel a dist-upgraded server still runs.
    kernels: dict[str, Kernel] = field(default_factory=dict)


#: Every release the test bed knows, and its kernels: the one place they are named.
RELEASES: dict[str, Release] = {
    "12": Release("12", "bookworm", "3.17", {
        "A": _kernel("A", "6.1.0-47"),  # 6.1.170
        "B": _kernel("B", "6.1.0-56"),  # 6.1.192
    }),
    "13": Release("13", "trixie", "4.1", {
        "A": _kernel("A", "6.12.90+deb13"),
        "B": _kernel("B", "6.12.118+deb13"),
        # A server dist-upgraded from Debian 12 still runs 12's kernel until its reboot.
        "O": _kernel("O", "6.1.0-56", suite="bookworm"),
    }),
}
DEFAULT_RELEASE = "13"
RELEASE_VARIABLE = "SEAMLESS_VM_RELEASE"


def _release() -> Release:
    """The release chosen by ``SEAMLESS_VM_RELEASE`` (12 or 13; 13 when unset)."""
    chosen = os.environ.get(RELEASE_VARIABLE, "") or DEFAULT_RELEASE
    if chosen not in RELEASES:
        raise VMError(f"{RELEASE_VARIABLE}={chosen!r} names no release the test bed knows",
                      hint=f"set it to one of {', '.join(RELEASES)} (or unset it: "
                           f"{DEFAULT_RELEASE})")
    return RELEASES[chosen]


RELEASE = _release()


def itools_default(stock: bool) -> bool:
    """Whether /boot's initramfs is initramfs-tools' (Debian's default generator, as on a
    server), with dracut's beside it as :attr:`Kernel.dracut_initrd`: on Debian 13 and
    on the stock server. Debian 12's image keeps dracut's, so that its tests go through
    the dracut path on 12. Under TCG initramfs-tools' is also 10-25 s faster from the
    kexec to the restorer than dracut's systemd in the initramfs."""
    return stock or RELEASE.version != "12"
DISTRIBUTION = RELEASE.codename
KERNELS: dict[str, Kernel] = RELEASE.kernels

#: Debian packages of the guest besides the kernels.  Project dependencies come
#: from Debian's archive (python3-click ...) so the guest needs no network.
PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "dbus",
    "dracut",
    # mkinitramfs without initramfs-tools' kernel hooks (dracut builds the boot
    # initramfs): the initramfs-tools restorer is tested with it.
    "initramfs-tools-core",
    "zstd",
    "criu",
    "kexec-tools",
    "kmod",
    "e2fsprogs",
    "iproute2",
    "procps",
    "psmisc",
    "python3",
    "python3-click",
    "python3-protobuf",
    "python3-psutil",
    "python3-jinja2",
    "python3-pyudev",
    "python3-xxhash",
    # The real services the upgrade is proven on.
    "redis-server",
    "tmux",
    "openssh-server",
    # Logins get a logind session (session-N.scope, the session pipe sshd holds), as on
    # a standard Debian server.
    "libpam-systemd",
)

#: A stock Debian server: the distribution's own services, their units enabled as apt
#: enables them and started at every boot, sandboxing and all. Only the stock-server
#: image has them (the other tests' guests would boot slower and carry them too).
STOCK_PACKAGES: tuple[str, ...] = (
    "postgresql",
    "mariadb-server",
    "redis-server",
    "memcached",
    "nginx",
    "apache2",
    "openssh-server",
    "cron",
    # A small daemon with DynamicUser=yes (and ProtectSystem=strict, ProtectHome) in
    # Debian 12 and 13 alike.
    "earlyoom",
    # Clients the tests connect with.
    "postgresql-client",
    "curl",
)

#: The reserved RAM region, as ``memmap=SIZE!OFFSET``: inside the guest's RAM,
#: above the kernel and low memory.
DEFAULT_MEMORY = "2G"
DEFAULT_REGION = "256M!1G"

#: The guest agent's virtio-serial port name (/dev/virtio-ports/NAME in the guest).
AGENT_PORT = "org.seamless.agent"

#: Where images are cached and running guests keep their state.
CACHE_DIR = Path(os.environ.get("SEAMLESS_VM_CACHE", Path.home() / ".cache" / "seamless-vm"))
