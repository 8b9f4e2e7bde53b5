"""Which kernels a CRIU release can work on: what is known to break, said once.

The upgrade's preflight asks before anything is frozen: the distribution's CRIU must be
able to restore on the target kernel (and it dumps on the running one, which
``criu check`` proves). Debian 12's CRIU is 3.17, Debian 13's 4.1.
"""

from __future__ import annotations

import re

from seamless.criu.wire import Version

#: (the first kernel affected, the first CRIU release that works there, why).
NEEDS: tuple[tuple[tuple[int, int], tuple[int, int], str], ...] = (
    ((6, 13), (4, 1), "from 6.13 the kernel maps the vDSO's clock pages as a mapping of "
                      "their own (vvar_vclock), which CRIU knows from 4.1"),
)


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as ``6.12.90+deb13-cloud-amd64``."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def unsupported(criu: Version, release: str) -> str | None:
    """Why ``criu`` cannot restore processes on the kernel ``release``, or None."""
    kernel = kernel_version(release)
    if kernel is None:
        return None
    for first_kernel, first_criu, why in NEEDS:
        if kernel >= first_kernel and (criu.major, criu.minor) < first_criu:
            return (f"CRIU {criu} cannot restore on Linux {release}: {why} "
                    f"(CRIU {first_criu[0]}.{first_criu[1]} or later is needed)")
    return None
