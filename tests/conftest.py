"""Host tests: nothing here freezes a process, loads a kernel or touches reserved RAM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test bed's own code (vm-tests/vmtest) is tested on the host too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vm-tests"))


@pytest.fixture(autouse=True)
def metrics_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """node-exporter's textfile directory is under tmp_path (absent unless a test makes
    it), never the host's."""
    from seamless.restore import metrics

    path = tmp_path / "node-exporter"
    monkeypatch.setattr(metrics, "TEXTFILE_DIR", path)
    return path


@pytest.fixture(autouse=True)
def lock_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """seamless's lock is taken under tmp_path, never in the host's /run."""
    from seamless import lock

    path = tmp_path / "run-seamless" / "lock"
    monkeypatch.setattr(lock, "LOCK", path)
    return path


@pytest.fixture(autouse=True)
def journal_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The journal's doors (syslog's socket, the kernel's log) are under tmp_path, absent
    unless a test makes them: nothing a host test logs reaches the host's journal."""
    from seamless import log

    monkeypatch.setattr(log, "SYSLOG", str(tmp_path / "dev-log"))
    monkeypatch.setattr(log, "KMSG", str(tmp_path / "kmsg"))
    return tmp_path


@pytest.fixture(autouse=True)
def no_ghosts_of_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The all-or-nothing restore's ghost mover never looks at the host's processes (a
    fake tree's root PID is some process of the host's): its /proc is empty."""
    from seamless.restore import restorer

    monkeypatch.setattr(restorer, "PROC", tmp_path / "no-proc")
