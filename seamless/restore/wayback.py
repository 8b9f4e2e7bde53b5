"""The way back: the new kernel runs every tree of the generation, or none and returns
to the kernel the upgrade came from, which restores them all.

The restore at boot holds each tree made but unrun until all are made (see
:class:`seamless.restore.restorer.Hold`). When one cannot be made, or a command the
operator required of the new kernel fails (``seamless upgrade --require``), no tree has
run: nothing of the generation was used. This kernel then loads the old one (its
kernel, initramfs and command line, which the upgrade recorded) and enters it with the
same generation and a new one-time token. The record says why; the old kernel's
restorer restores every tree, and never sends them back again (at most one way back
per upgrade).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from seamless.kexec import cmdline, loader
from seamless.log import complete_step, log
from seamless.memstore import handoff
from seamless.run import CommandError, run

#: How long each required command may take in the new kernel.
GATE_TIMEOUT = 120.0


def unusable(record: handoff.UpgradeRecord, root: Path = Path("/")) -> str | None:
    """Why this boot cannot go back (None when it can): the upgrade recorded no way
    back, it is the way back already, or the old kernel's files are not readable here
    (a /boot the initramfs has not mounted)."""
    back = record.way_back
    if back is None:
        return "the upgrade recorded no way back (seamless upgrade --no-way-back)"
    if record.refused is not None:
        return (f"this is the way back already: {record.refused.get('release')} refused "
                "the trees")
    for path in (back.kernel, back.initrd):
        if not os.access(root / path.lstrip("/"), os.R_OK):
            return f"{path} is not readable in this boot"
    return None


def failed_gate(commands: list[str], root: Path = Path("/")) -> str | None:
    """Run each command the upgrade requires of this kernel (``sh -c``, in the real
    root); the first that fails, and how, or None when all exit 0."""
    for command in commands:
        argv = ["sh", "-c", command]
        if root != Path("/"):
            argv = ["chroot", str(root), *argv]
        with complete_step(f"checking the required command: {command}"):
            try:
                done = run(argv, check=False, timeout=GATE_TIMEOUT)
            except subprocess.TimeoutExpired:
                return f"the required command `{command}` did not end in {GATE_TIMEOUT:.0f} s"
            except CommandError as e:  # no chroot, no sh
                return f"the required command `{command}` could not run: {e.stderr}"
            except OSError as e:
                return f"the required command `{command}` could not run: {e.strerror}"
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip()
            return (f"the required command `{command}` exited {done.returncode}"
                    + (f": {said.splitlines()[-1]}" if said else ""))
    return None


def refusal(reason: str) -> dict[str, Any]:
    """Why this kernel runs none of the trees, as the record and the report keep it."""
    return {"release": os.uname().release, "reason": reason, "at": time.time(),
            "boot_id": handoff.boot_id()}


def go_back(store_root: Path, record: handoff.UpgradeRecord, refused: dict[str, Any],
            root: Path = Path("/")) -> None:
    """Load the old kernel with the way back's command line and enter it; does not return.
    ``refused``: why (see :func:`refusal`). Raises :class:`SeamlessError` (with nothing
    entered) when the old kernel does not load."""
    back = record.way_back
    assert back is not None and record.refused is None
    token = handoff.new_token()
    args = cmdline.with_restore(cmdline.split(back.cmdline), record.generation,
                                record.last_pid or None, token)
    with complete_step(f"loading {back.release} to go back to"):
        loader.load(root / back.kernel.lstrip("/"), root / back.initrd.lstrip("/"),
                    cmdline.join(args))
    record.refused = refused
    record.times.update(refused=refused["at"], entering_back=time.time())
    record.token_sha256 = handoff.digest(token)
    record.used_by_boot = None  # for the old kernel's restorer to use, once
    handoff.write(store_root, record)
    log.error("not running the trees in %s: %s; going back to %s with every tree",
              os.uname().release, refused["reason"], back.release)
    log.debug("way back: %s", shlex.join(args))
    loader.enter()
