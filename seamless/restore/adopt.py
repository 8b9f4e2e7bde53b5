"""Hand restored services back to systemd, for this boot only.

A restored service's processes are already running, in the unit's cgroup
(CRIU puts them back there), before systemd starts.  systemd must not start a
second copy, and must show these processes under the unit's name.  For this
boot only (everything goes under /run), the unit is told that its start is
``/bin/true`` and that its main process is the one in a PID file:

- a unit with a unit file gets a drop-in (``NAME.service.d/50-seamless-adopt.conf``)
  replacing its start commands;
- a transient unit (``systemd-run``) has no file in the new boot: it gets a
  whole runtime unit, wanted by multi-user.target.

``systemctl status NAME`` then shows the original PID, ``systemctl stop NAME``
stops it, and after an ordinary reboot /run is empty and the unit starts as usual.
"""

from __future__ import annotations

from pathlib import Path

UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
RUNTIME_UNITS = Path("run/systemd/system")
PID_FILES = Path("run/seamless/adopt")
DROPIN = "50-seamless-adopt.conf"

ADOPT_SERVICE = """\
[Service]
Type=forking
PIDFile=/{pid_file}
ExecCondition=
ExecStartPre=
ExecStart=
ExecStart=/bin/true
ExecStartPost=
"""

RESTORED_UNIT = """\
[Unit]
Description={unit} (restored by seamless)

[Service]
Type=forking
PIDFile=/{pid_file}
ExecStart=/bin/true
"""


def has_unit_file(unit: str, root: Path) -> bool:
    """Whether the unit (or, for an instance ``NAME@I.service``, its template) has a file."""
    prefix, at, _ = unit.partition("@")
    names = [unit, f"{prefix}@.service"] if at else [unit]
    return any((root / d / n).exists() for d in UNIT_DIRS for n in names)


def adopt(unit: str, pid: int, root: Path = Path("/")) -> Path:
    """Make systemd take ``pid`` as the main process of ``unit`` in this boot; returns the
    runtime file written."""
    if not unit.endswith(".service") or "/" in unit:
        raise ValueError(f"not a service unit name: {unit!r}")
    pid_file = PID_FILES / f"{unit}.pid"
    (root / PID_FILES).mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / pid_file).write_text(f"{pid}\n")
    runtime = root / RUNTIME_UNITS
    if has_unit_file(unit, root):
        path = runtime / f"{unit}.d" / DROPIN
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ADOPT_SERVICE.format(pid_file=pid_file))
        return path
    path = runtime / unit
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RESTORED_UNIT.format(unit=unit.removesuffix(".service"), pid_file=pid_file))
    wants = runtime / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / unit
    if not link.is_symlink():
        link.symlink_to(Path("..") / unit)
    return path
