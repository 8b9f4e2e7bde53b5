"""What a command that changes something logs reaches the journal of its boot: through
syslog where journald listens, through the kernel's log in an initramfs."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from seamless import log as seamless_log
from seamless.cli import cli


@pytest.fixture(autouse=True)
def _own_handlers() -> Iterator[None]:
    saved = list(seamless_log.log.handlers)
    yield
    for handler in seamless_log.log.handlers:
        if handler not in saved:
            handler.close()
    seamless_log.log.handlers[:] = saved


def test_syslog_gets_the_steps_and_the_journal_only_error(journal_in_tmp: Path) -> None:
    path = journal_in_tmp / "dev-log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    try:
        seamless_log.setup_logging(False)
        assert isinstance(seamless_log.log_to_journal(), logging.handlers.SysLogHandler)
        with seamless_log.complete_step("freezing 3 trees"):
            pass
        seamless_log.journal_only(logging.ERROR, "Error: CRIU failed")
        got = [server.recv(4096).decode() for _ in range(3)]
    finally:
        server.close()
    # <daemon.info> is 3*8+6 = 30; <daemon.err> 27; the identifier carries the PID
    assert got[0].startswith("<30>seamless[") and got[0].endswith("‣ freezing 3 trees\x00")
    assert "freezing 3 trees done in" in got[1]
    assert got[2].startswith("<27>seamless[") and "Error: CRIU failed" in got[2]


def test_in_an_initramfs_the_kernel_log_gets_one_line_per_record(journal_in_tmp: Path) -> None:
    kmsg = journal_in_tmp / "kmsg"
    kmsg.write_text("")
    seamless_log.setup_logging(False)
    handler = seamless_log.log_to_journal()
    assert isinstance(handler, seamless_log.KmsgHandler)
    seamless_log.log.info("restoring generation 4")
    seamless_log.log.warning("tree 812: " + "x" * 2000)
    seamless_log.log.debug("not this one")
    handler.flush()
    lines = kmsg.read_text().splitlines()
    assert lines[0] == "<6>seamless: restoring generation 4"
    assert lines[1].startswith("<4>seamless: tree 812: xxx") and len(lines[1]) == 1000
    assert len(lines) == 2


def test_a_unit_s_stderr_is_the_journal_already_and_nowhere_is_no_error(
        journal_in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (journal_in_tmp / "kmsg").write_text("")
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert seamless_log.log_to_journal() is None
    # inherited by a child whose stderr is something else (a pipe to an agent): not it
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert isinstance(seamless_log.log_to_journal(), seamless_log.KmsgHandler)
    monkeypatch.delenv("JOURNAL_STREAM")
    (journal_in_tmp / "kmsg").unlink()
    assert seamless_log.log_to_journal() is None


def test_only_the_commands_that_change_something_log_to_the_journal(
        journal_in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("seamless.cli.log_to_journal", lambda: calls.append("journal"))
    CliRunner().invoke(cli, ["plan", "--help"])
    CliRunner().invoke(cli, ["status", "--help"])
    assert calls == []
    CliRunner().invoke(cli, ["upgrade", "--help"])
    assert calls == ["journal"]
