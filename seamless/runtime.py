"""A tree's runtime files: what it keeps where the new boot starts empty, carried along.

A service keeps state the kernel does not hold for it and CRIU does not copy:

- its PID file (``PIDFile=``): ``systemctl stop``/``reload`` and the service's own
  scripts (``start-stop-daemon --pidfile``, ``pg_ctlcluster``) read it;
- its runtime directories (``RuntimeDirectory=``, under /run): PID and lock files,
  the directories of its unix sockets;
- files on tmpfs it holds open (cron locks /run/crond.pid): CRIU reopens them by
  path, and refuses one whose size changed;
- its private /tmp and /var/tmp (``PrivateTmp=``): the new boot's tmpfiles removes
  every ``systemd-private-*`` directory of an earlier boot, and the restore binds
  them again into the service's mount namespace (the directories are read off it).

/run and the tmpfs mounts are empty in the new boot, and /tmp is cleaned: the
restore makes these again, as they were, before the tree runs. Small files only
(a service's runtime state is PID files and locks); a larger one is left out and
named in the log.
"""

from __future__ import annotations

import base64
import glob
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seamless import safepath
from seamless.log import log
from seamless.run import CommandError, run

#: Largest file carried, and most carried for one tree (bytes).
FILE_LIMIT = 1 << 20
TREE_LIMIT = 8 << 20
RUN = "/run"


def unit_paths(units: Iterable[str | None]) -> dict[str, list[str]]:
    """The PID file and runtime directories of each service unit, asked of systemd once
    for all (nothing when it does not answer). Its private /tmp and /var/tmp are read off
    its mount namespace (:func:`seamless.collect.namespaces.private_tmp_dirs`)."""
    names = sorted({u for u in units if u and u.endswith(".service")})
    if not names:
        return {}
    try:
        out = run(["systemctl", "show", "--property=Id,PIDFile,RuntimeDirectory",
                   "--", *names]).stdout.decode(errors="replace")
    except (CommandError, OSError) as e:
        log.warning("could not ask systemd for the units' runtime files: %s", e)
        return {}
    found: dict[str, list[str]] = {}
    for block in out.split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        unit = props.get("Id", "")
        if not unit:
            continue
        paths = [p for p in [props.get("PIDFile", "")] if p.startswith("/")]
        paths += [f"{RUN}/{d}" for d in props.get("RuntimeDirectory", "").split() if d]
        found[unit] = paths
    return found


def pid_files(pids: Iterable[int], run_dir: str = RUN) -> list[str]:
    """The PID files under /run (``*.pid`` two levels down) that name one of ``pids``:
    a service's scripts find it by them (apachectl reads /run/apache2/apache2.pid)."""
    wanted = {str(p) for p in pids}
    found = []
    for path in sorted(glob.glob(f"{run_dir}/*.pid") + glob.glob(f"{run_dir}/*/*.pid")):
        try:
            with open(path, "rb") as f:
                if f.read(32).strip().decode(errors="replace") in wanted:
                    found.append(path)
        except OSError:
            continue
    return found


def _entry(path: str, st: os.stat_result) -> dict[str, Any]:
    return {"path": path, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}


def collect(paths: Sequence[str], volatile_open: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The entries that make ``paths`` (files, or directories with all beneath them) and
    the open tmpfs files ``volatile_open`` again: directories (with their parents under
    /run), regular files with their bytes, symbolic links; parents first.

    The open files come first: CRIU cannot restore a tree without them, while a file of
    a runtime directory left out for the limits is only missing (and logged)."""
    entries: dict[str, dict[str, Any]] = {}
    total = 0

    def add(path: str) -> None:
        nonlocal total
        if path in entries:
            return
        try:
            st = os.lstat(path)
        except OSError:
            return
        entry = _entry(path, st)
        if stat.S_ISDIR(st.st_mode):
            entry["kind"] = "dir"
        elif stat.S_ISLNK(st.st_mode):
            entry.update(kind="symlink", target=os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            if st.st_size > FILE_LIMIT or total + st.st_size > TREE_LIMIT:
                log.warning("not carrying %s: %d bytes is more than a runtime file", path,
                            st.st_size)
                return
            try:
                with open(path, "rb") as f:
                    data = f.read(FILE_LIMIT + 1)
            except OSError:
                return
            total += len(data)
            entry.update(kind="file", data=base64.b64encode(data).decode())
        else:
            return  # sockets are bound again by CRIU, pipes made by the restorer
        entries[path] = entry

    for path in [*volatile_open, *paths]:
        parents = Path(path).parents
        for parent in reversed(parents[:-1]):  # "/run", "/run/x" ... not "/"
            if str(parent) in ("/tmp", "/var", "/var/tmp", RUN):
                continue
            add(str(parent))
        add(path)
        if os.path.isdir(path) and not os.path.islink(path):
            for top, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(dirs) + sorted(files):
                    add(os.path.join(top, name))
    return list(entries.values())


def recreate(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Make a tree's runtime files again where the new boot has none (see
    :func:`collect`), parents first, never through a user's symbolic link (see
    :mod:`seamless.safepath`); what exists is left as it is. Returns the paths made."""
    made = []
    for e in entries:
        path, kind = str(e["path"]), e.get("kind")
        uid, gid, mode = int(e["uid"]), int(e["gid"]), int(e.get("mode", 0))
        try:
            if kind == "dir":
                new = safepath.make_dir(path, uid, gid, mode, parents=False)
            elif kind == "file":
                new = safepath.make_file(path, base64.b64decode(e["data"]), uid, gid, mode,
                                         parents=False)
            elif kind == "symlink":
                new = safepath.make_symlink(path, str(e["target"]), uid, gid, parents=False)
            else:
                continue
        except (safepath.UnsafePath, OSError) as err:
            log.warning("not making %s again: %s", path, err)
            continue
        if new:
            made.append(path)
    if made:
        log.info("made %d runtime files and directories again", len(made))
    return made
