"""The kernel modules CRIU needs loaded, on both sides of the kexec."""

from __future__ import annotations

from seamless import kernel_modules
from seamless.log import log
from seamless.run import run

#: What CRIU needs loaded: socket diagnostics to dump sockets, nftables for the
#: network lock, tun and veth for its checks.
CRIU_MODULES = kernel_modules.named("criu")


def load_criu_modules() -> None:
    """Load what CRIU needs (a module that is missing shows in criu check)."""
    result = run(["modprobe", "-a", *CRIU_MODULES], check=False)
    if result.returncode != 0:
        log.debug("modprobe: %s", result.stderr.decode(errors="replace").strip())
