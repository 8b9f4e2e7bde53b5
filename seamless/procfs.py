"""The one reader of /proc/PID/stat."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")

#: Fields of /proc/PID/stat, numbered as proc_pid_stat(5) numbers them.
STATE, PPID, FLAGS, STARTTIME = 3, 4, 9, 22


def stat_field(pid: int | str, number: int, proc: Path = PROC) -> str | None:
    """Field ``number`` of ``pid``'s stat (``"self"``: this process's), or None when the
    process is gone or the field is not there. The command name (field 2) may hold
    spaces and parentheses, so the fields are counted from its last ")"."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    index = number - 3
    return fields[index] if 0 <= index < len(fields) and ")" in text else None
