"""The one door to child processes: run() waits for one, spawn() starts one beside."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from seamless.run import CommandError, run, spawn


def test_a_spawned_process_has_its_session_closed_stdin_and_only_the_fds_given(
    tmp_path: Path,
) -> None:
    """Out of the terminal's reach (a session of its own), stdin closed, and of our
    descriptors only those passed."""
    r, w = os.pipe()
    kept_r, kept_w = os.pipe()
    out = tmp_path / "out"
    code = ("import os, sys; print(os.getsid(0) == os.getpid(), sys.stdin.read() == '', "
            f"[fd for fd in ({w}, {kept_w}) if os.path.exists(f'/proc/self/fd/{{fd}}')])")
    try:
        with open(out, "wb") as f:
            proc = spawn([sys.executable, "-c", code], pass_fds=[kept_w], stdout=f.fileno())
        assert proc.wait(timeout=30) == 0
    finally:
        for fd in (r, w, kept_r, kept_w):
            os.close(fd)
    assert out.read_text().split() == ["True", "True", f"[{kept_w}]"]


def test_a_program_that_is_not_there() -> None:
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/seamless-test"])
    with pytest.raises(CommandError, match="command not found"):
        run(["/nonexistent/seamless-test"])
