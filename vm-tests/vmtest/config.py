"""What goes into the guest, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DISTRIBUTION = "bookworm"


@dataclass(frozen=True)
class Kernel:
    label: str  # "A" or "B"
    package: str  # the Debian package that carries it
    release: str  # `uname -r` once it runs

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


def _kernel(label: str, abi: str) -> Kernel:
    release = f"{abi}-cloud-amd64"
    return Kernel(label=label, package=f"linux-image-{release}", release=release)


#: The upgrade path the tests walk: A is the running kernel, B the target.
KERNELS: dict[str, Kernel] = {
    "A": _kernel("A", "6.1.0-47"),  # 6.1.170
    "B": _kernel("B", "6.1.0-56"),  # 6.1.192
}

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
    "python3-pip",
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
