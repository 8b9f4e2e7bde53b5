"""Lazy restore: a tree runs again before all of its memory is back.

For each tree, ``criu lazy-pages`` serves the tree's memory from its page images
in the store: CRIU restores the tree without copying its pages, registers them
with userfaultfd, and the daemon fills each page when the tree first touches it,
then copies the rest in the background. The restore no longer grows with the
tree's memory; the memory arrives while the tree already runs.

The daemon runs under a shell that writes its exit status next to the images,
so that whoever waits for it (the restorer's finisher, a process that is not
its parent) knows whether every page arrived. A tree whose memory did not all
arrive must not run on: its missing pages would read as zeros.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from seamless.errors import SeamlessError
from seamless.log import log
from seamless.run import spawn

#: Written by the shell around the daemon: its exit status.
STATUS = "lazy-pages.status"
LOG = "lazy-pages.log"
#: CRIU's restore and the daemon meet at this socket in the work directory (the images).
SOCKET = "lazy-pages.socket"


@dataclass
class Pager:
    """One ``criu lazy-pages`` daemon (under its shell) serving a tree's memory."""

    images_dir: Path
    pid: int  #: the shell's
    #: A pidfd of the shell, opened while it was surely ours (a forked finisher inherits it):
    #: waiting and signalling never reach another process that took the PID later.
    pidfd: int | None = field(default=None, repr=False, compare=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    #: The images directory, open: its status and log are read through it. In an
    #: initramfs without systemd the store's mount is moved out of the real root and back
    #: while the daemon runs, and a daemon done in between must not read as killed.
    dir_fd: int | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, images_dir: Path, binary: str = "criu", ready_within: float = 30) -> Pager:
        """Start the daemon and wait until it listens for the restore."""
        for name in (STATUS, SOCKET):
            (images_dir / name).unlink(missing_ok=True)
        ready_r, ready_w = os.pipe()
        # The status appears whole (renamed into place) once the daemon has exited.
        script = (f'"$0" lazy-pages -D . --status-fd {ready_w} -o {LOG} -v2; '
                  f"echo $? > {STATUS}.tmp && mv {STATUS}.tmp {STATUS}")
        try:
            proc = spawn(["sh", "-c", script, binary], cwd=images_dir, pass_fds=(ready_w,))
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            raise SeamlessError(f"cannot start criu lazy-pages: {e.strerror}") from e
        os.close(ready_w)
        pager = cls(images_dir, proc.pid, os.pidfd_open(proc.pid), proc,
                    os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        try:
            ready, _, _ = select.select([ready_r], [], [], ready_within)
            if not ready or not os.read(ready_r, 1):
                pager.stop()
                raise SeamlessError(
                    f"criu lazy-pages did not start for {images_dir}: {pager.log_tail()}")
        finally:
            os.close(ready_r)
        return pager

    def _read(self, name: str) -> str:
        if self.dir_fd is None:
            return (self.images_dir / name).read_text(errors="replace")
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        with os.fdopen(fd, errors="replace") as f:
            return f.read()

    def log_tail(self) -> str:
        try:
            lines = self._read(LOG).strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def status(self) -> int | None:
        """The daemon's exit status, once it has exited (None before)."""
        try:
            text = self._read(STATUS).strip()
        except FileNotFoundError:
            return None
        return int(text) if text.lstrip("-").isdigit() else 255

    def running(self) -> bool:
        return self.pidfd is not None and not select.select([self.pidfd], [], [], 0)[0]

    def wait(self, timeout: float | None = None) -> int:
        """Wait until every page has arrived (the daemon exits); its exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.status()) is None:
            if self.pidfd is None:
                return 255
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise TimeoutError(f"criu lazy-pages for {self.images_dir} still runs")
            if select.select([self.pidfd], [], [], left)[0]:  # the shell has exited
                status = self.status()
                return 255 if status is None else status  # killed before writing it
        return status

    def stop(self) -> None:
        """End the daemon and its shell (the restore it served failed)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def finish(pagers: dict[int, Pager], timeout: float = 3600) -> dict[int, str]:
    """Wait for every tree's memory to arrive. A tree whose daemon failed is killed (its
    missing pages would read as zeros). Returns, by tree root, why each failed."""
    failed: dict[int, str] = {}
    for root, pager in pagers.items():
        try:
            status = pager.wait(timeout)
        except TimeoutError as e:
            pager.stop()
            status, why = 255, str(e)
        else:
            why = f"criu lazy-pages exited with {status}: {pager.log_tail()}"
        if status != 0:
            failed[root] = why
            log.error("the memory of tree %d did not all arrive (%s): stopping it", root, why)
            kill_tree(root)
    return failed


def kill_tree(root: int, proc: Path = Path("/proc"), within: float = 300) -> None:
    # In an initramfs without systemd /proc leaves the real root for a moment, and
    # psutil finds the tree there.
    import psutil  # only here: its import is a tenth of the restorer's start

    deadline = time.monotonic() + within
    while not (proc / "self").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
