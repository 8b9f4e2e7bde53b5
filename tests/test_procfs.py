"""The one reader of /proc/PID/stat."""

from __future__ import annotations

import os
from pathlib import Path

from seamless import procfs


def test_fields_are_counted_after_a_command_name_with_spaces_and_parentheses(
    tmp_path: Path,
) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text(
        "42 (a) b (c)) D 7 42 42 0 -1 2097152 0 0 0 0 1 2 0 0 20 0 1 0 12345 0 0\n")
    assert procfs.stat_field(42, procfs.STATE, tmp_path) == "D"
    assert procfs.stat_field(42, procfs.PPID, tmp_path) == "7"
    assert procfs.stat_field(42, procfs.FLAGS, tmp_path) == "2097152"
    assert procfs.stat_field(42, procfs.STARTTIME, tmp_path) == "12345"
    assert procfs.stat_field(42, 99, tmp_path) is None  # not there
    assert procfs.stat_field(43, procfs.STATE, tmp_path) is None  # gone


def test_this_process_reads_itself() -> None:
    assert procfs.stat_field("self", procfs.STATE) in {"R", "S"}
    assert procfs.stat_field("self", procfs.PPID) == str(os.getppid())
