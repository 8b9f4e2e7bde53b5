"""One lock for everything that writes the store or loads a kernel (seamless.lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seamless import lock
from seamless.errors import SeamlessError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lock is root's (as seamless)")


def test_a_second_command_is_refused_with_who_holds_the_lock(lock_in_tmp: Path) -> None:
    calls: list[str] = []

    @lock.exclusive("seamless checkpoint")
    def checkpoint() -> str:
        calls.append("ran")
        return "done"

    with lock.held("seamless upgrade"):
        with pytest.raises(SeamlessError, match=rf"running: seamless upgrade \(PID {os.getpid()}\)"
                                                r"; seamless checkpoint would get in its way"):
            checkpoint()
        assert calls == []
    assert checkpoint() == "done" and calls == ["ran"]  # released when the first ended
    assert lock_in_tmp.stat().st_mode & 0o777 == 0o600


def test_the_lock_is_held_by_another_process_until_it_ends(lock_in_tmp: Path) -> None:
    """What a lazy restore's finisher does: it holds the lock as long as it runs."""
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "from pathlib import Path\nfrom seamless import lock\n"
            f"lock.LOCK = Path({str(lock_in_tmp)!r})\n"
            "lock.hold('finishing the lazy restore'); print('held', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(SeamlessError, match="finishing the lazy restore"):
            lock.hold("seamless upgrade")
    finally:
        holder.communicate("")
    fd = lock.hold("seamless upgrade")
    assert fd is not None
    os.close(fd)
