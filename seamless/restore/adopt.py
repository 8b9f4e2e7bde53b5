"""Hand restored services back to systemd, for this boot only.

A restored service's processes are already running, in the unit's cgroup
(CRIU puts them back there), before systemd starts.  systemd must not start a
second copy, and must show these processes under the unit's name.  For this
boot only (everything goes under /run), the unit is told that its start is
``/bin/true`` and that its main process is the one in a PID file. ``/bin/true`` runs
with full privileges (``+``), outside the unit's sandbox: the restored process has its
sandbox already, and a second one set up around ``/bin/true`` can fail (redis's
``User=`` and ``ProtectSystem=strict`` made it "Permission denied"). And systemd
refuses to start a unit with ``SendSIGKILL=no`` (MariaDB's) while its cgroup has
processes, which the adopted unit's has: the drop-in says yes for that start.

- a unit with a unit file gets a drop-in (``NAME.service.d/50-seamless-adopt.conf``)
  replacing its start commands;
- a transient unit (``systemd-run``) has no file in the new boot: it gets a
  whole runtime unit.

Either is wanted by multi-user.target for this boot: a unit started by hand and never
enabled is wanted by nothing, and a boot that restored it before init would leave its
process running unknown to systemd (and a later ``systemctl start`` would run a second
copy).

``systemctl status NAME`` then shows the original PID. The drop-ins serve that one
start only: once systemd has started the adopted units, ``seamless-adopted.service``
removes them (and those units' links from multi-user.target) and reloads systemd, so
the units' own definitions (and enablement) are back for everything after
(``systemctl restart``, ``reload`` and ``stop`` do what they did before the upgrade;
the unit's own PID file came back with its runtime files).
After an ordinary reboot /run is empty and the units start as usual.
"""

from __future__ import annotations

from pathlib import Path

#: Where systemd finds unit files (the runtime directory aside), the operator's first; the
#: generators' directories exist only once systemd has run them (after switch-root).
UNIT_DIRS = ("etc/systemd/system", "run/systemd/generator.early", "run/systemd/generator",
             "usr/local/lib/systemd/system", "usr/lib/systemd/system", "lib/systemd/system",
             "run/systemd/generator.late")
RUNTIME_UNITS = Path("run/systemd/system")
WANTS = RUNTIME_UNITS / "multi-user.target.wants"
PID_FILES = Path("run/seamless/adopt")
DROPIN = "50-seamless-adopt.conf"

ADOPT_SERVICE = """\
[Service]
Type=forking
PIDFile=/{pid_file}
ExecCondition=
ExecStartPre=
ExecStart=
ExecStart=+/bin/true
ExecStartPost=
SendSIGKILL=yes
"""

RESTORED_UNIT = """\
[Unit]
Description={unit} (restored by seamless)

[Service]
Type=forking
PIDFile=/{pid_file}
ExecStart=/bin/true
"""


FINISH_UNIT = "seamless-adopted.service"

#: It waits until the boot has finished before it reloads systemd, so that no reload
#: runs among the boot's own jobs (a stock server's boot that seemed never to settle
#: was first blamed on one: it was the restore going back to the old kernel).
#: Type=exec: the boot does not wait for it. Bounded: after FINISH_WAIT seconds it
#: goes on whatever the state.
FINISH_WAIT = 300
FINISH_SERVICE = """\
[Unit]
Description=Give the services restored by seamless their own definitions back
After={units}

[Service]
Type=exec
ExecStart=/bin/sh -c 'for i in $$(seq {wait}); do \\
case "$$(systemctl is-system-running)" in initializing|starting) sleep 1 ;; *) break ;; esac; \\
done; /bin/rm -f {dropins} && exec /bin/systemctl daemon-reload'
"""


def system_unit(cgroup: str) -> str | None:
    """The system manager's unit a process ran in, from its cgroup: the first unit of the
    path. A user's own units (under ``user@UID.service``) are the user manager's, never a
    system unit of the same name: a user's ``ssh.service`` must not take over the
    system's at adoption."""
    for part in cgroup.split("/"):
        if part.endswith((".service", ".scope")):
            return part
    return None


def unit_file(unit: str, root: Path) -> Path | None:
    """The unit's file (for an instance ``NAME@I.service``, its own or its template's),
    the one systemd reads first; None when it has none."""
    prefix, at, _ = unit.partition("@")
    names = [unit, f"{prefix}@.service"] if at else [unit]
    return next((root / d / n for d in UNIT_DIRS for n in names if (root / d / n).exists()),
                None)


def _want(unit: str, target: Path, root: Path) -> None:
    """Link ``unit`` (its file: ``target``) into multi-user.target's wants, this boot."""
    wants = root / WANTS
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.is_symlink():
        link.symlink_to(target)


def adopt(unit: str, pid: int, root: Path = Path("/")) -> Path:
    """Make systemd take ``pid`` as the main process of ``unit`` in this boot; returns the
    runtime file written."""
    if not unit.endswith(".service") or "/" in unit:
        raise ValueError(f"not a service unit name: {unit!r}")
    pid_file = PID_FILES / f"{unit}.pid"
    (root / PID_FILES).mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / pid_file).write_text(f"{pid}\n")
    runtime = root / RUNTIME_UNITS
    source = unit_file(unit, root)
    if source is not None:
        path = runtime / f"{unit}.d" / DROPIN
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ADOPT_SERVICE.format(pid_file=pid_file))
        _want(unit, Path("/") / source.relative_to(root), root)
        return path
    path = runtime / unit
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RESTORED_UNIT.format(unit=unit.removesuffix(".service"), pid_file=pid_file))
    _want(unit, Path("..") / unit, root)
    return path


def finish_unit(dropins: list[Path], root: Path = Path("/")) -> Path | None:
    """The runtime unit that removes the adoption drop-ins ``dropins`` (paths under
    ``root``) and their units' links from multi-user.target once systemd has started
    the units, and reloads it."""
    if not dropins:
        return None
    units = sorted({d.parent.name.removesuffix(".d") for d in dropins})
    links = [Path("/") / WANTS / unit for unit in units]
    path = root / RUNTIME_UNITS / FINISH_UNIT
    path.write_text(FINISH_SERVICE.format(
        units=" ".join(units), wait=FINISH_WAIT,
        dropins=" ".join(["/" + str(d.relative_to(root)) for d in dropins]
                         + [str(link) for link in links])))
    _want(FINISH_UNIT, Path("..") / FINISH_UNIT, root)
    return path
