"""Checkpointing on a real guest: every tree dumped by CRIU and held frozen together."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import qemu
from vmtest.log import log, record
from vmtest.workloads import (
    SPAWN_THROUGH_FIFO,
    VFORK_SPIN,
    prepare_for_criu,
    read_counter,
    start_counter,
    start_service,
)

pytestmark = pytest.mark.vm


#: Dump the trees of the PIDs given, report, hold until a line on stdin, release.
HOLD = r"""
import json, sys
from pathlib import Path
import psutil
from seamless.collect.checkpoint import dump_all
from seamless.criu import Criu
from seamless.collect.processes import ProcessInfo, ProcessTree

trees = []
for pid in map(int, sys.argv[2:]):
    p = ProcessInfo(pid, 1, "python3", (), "root", "", 0)
    trees.append(ProcessTree(p, [p]))
held = dump_all(trees, Path(sys.argv[1]), Criu(timeout=600))
print(json.dumps([{"pid": d.tree.root.pid, "bytes": d.bytes_written,
                   "dump": d.dump_seconds} for d in held.dumps]), flush=True)
sys.stdin.readline()
held.release()
print(json.dumps([{"pid": d.tree.root.pid, "freeze": d.freeze_seconds} for d in held.dumps]))
"""


def counters(guest: qemu.Guest, n: int) -> list[int]:
    return [read_counter(guest, f"/root/counter{i}") for i in range(n)]


def test_dumped_trees_stay_frozen_together_until_released(guest_a: qemu.Guest) -> None:
    """Two running counters are dumped one after the other; while held neither counts;
    released, both count on with the same PIDs, and their images are on disk."""
    prepare_for_criu(guest_a)
    pids = [start_counter(guest_a, f"counter{i}", f"/root/counter{i}") for i in range(2)]

    proc = guest_a.channel.start(["python3", "-c", HOLD, "/root/gen", *map(str, pids)],
                                 stdin=True)
    out, err = b"", b""
    for fd, data in proc.events(timeout=300):
        if fd == 2:
            err += data
        else:
            out += data
            if b"\n" in out:
                break
    assert b"\n" in out, f"the checkpoint ended early: {err.decode(errors='replace')}"
    dumped = json.loads(out.split(b"\n")[0])
    assert [d["pid"] for d in dumped] == pids
    assert all(d["bytes"] > 1 << 20 for d in dumped)

    frozen = counters(guest_a, 2)
    time.sleep(1.5)
    assert counters(guest_a, 2) == frozen, "a held tree kept running"
    images = guest_a.run("sh", "-c", "ls /root/gen/*/pages-*.img | wc -l")
    assert int(images) >= 2

    proc.write(b"release\n")
    result = proc.wait(timeout=120)
    assert result.returncode == 0, result.stderr
    freeze = json.loads(result.stdout.split(b"\n")[-2])
    time.sleep(1.0)
    after = counters(guest_a, 2)
    assert all(a > f for a, f in zip(after, frozen, strict=True)), "a tree was not thawed"
    for pid in pids:
        guest_a.run("kill", "-0", str(pid))
    for d in dumped:
        record(f"dump of a held tree ({d['bytes'] >> 20} MiB)", d["dump"])
    for f in freeze:
        record("freeze window of a held tree (incl. 1.5 s of holding)", f["freeze"])


#: Freeze and thaw the cgroup argv[1] argv[2] times with seamless's Freezer; count the
#: freezes that caught a task in a vfork and thawed for a moment, and what was left in one.
FREEZE_LOOP = r"""
import json, sys
from pathlib import Path
from seamless.collect import freeze
from seamless.collect.freeze import Freezer, in_vfork
cgroup, n = sys.argv[1], int(sys.argv[2])
writes = []
real = freeze._write
def count(path, text):
    writes.append(text)
    real(path, text)
freeze._write = count
left = []
for _ in range(n):
    freezer = Freezer({1: cgroup}, watchdog=False)
    freezer.freeze()
    left += in_vfork(Path("/sys/fs/cgroup") / cgroup.lstrip("/"))
    freezer.thaw()
print(json.dumps({"again": writes.count("1") - n, "left": left}))
"""


def test_a_tree_frozen_in_a_vfork_is_let_exec_or_refused(guest_a: qemu.Guest) -> None:
    """A shell frozen while it waits for its vfork child to exec can never be stopped by
    CRIU (the dump times out): the freeze thaws for a moment and tries again, and refuses,
    changing nothing, a tree whose child never gets to its exec."""
    g = guest_a
    prepare_for_criu(g)
    start_service(g, "spin", "/bin/sh", "-c", VFORK_SPIN)
    # 1. The shell is caught in a vfork in about one freeze of 20 to 40: never left so.
    loop = json.loads(g.run("python3", "-c", FREEZE_LOOP, "/system.slice/spin.service", "200"))
    assert loop["left"] == [], loop
    log.info("freezes of 200 that caught the shell in a vfork and froze again: %d",
             loop["again"])

    # 2. The spawned child waits for a writer on the FIFO before its exec: refused.
    g.run("mkfifo", "/run/gate")
    start_service(g, "spawner", "python3", "-c", SPAWN_THROUGH_FIFO, "/run/gate",
                  "/root/spawns")
    g.sh("for i in $(seq 100); do grep -q kernel_clone /proc/$(systemctl show -P MainPID "
         "spawner)/wchan && exit 0; sleep 0.1; done; exit 1")
    refused = g.channel.run(["seamless", "checkpoint", "--images", "/root/ckpt",
                             "--leave-running", "--no-pre-dump"], timeout=300)
    assert refused.returncode == 1, refused.stderr
    assert b"stays in a vfork" in refused.stderr and b"nothing was changed" in refused.stderr
    assert g.sh("grep -l 1 /sys/fs/cgroup/system.slice/*/cgroup.freeze || true") == ""
    assert g.sh("ls -d /root/ckpt* 2>/dev/null || true") == ""

    # 3. A writer holds the FIFO open: the child runs, and both trees are dumped.
    start_service(g, "gate", "/bin/sh", "-c", "exec 3<>/run/gate; exec sleep infinity")
    g.sh("for i in $(seq 100); do test -s /root/spawns && exit 0; sleep 0.1; done; exit 1")
    for i in range(2):
        done = g.channel.run(["seamless", "checkpoint", "--images", f"/root/ckpt{i}",
                              "--leave-running", "--no-pre-dump", "--json"], timeout=600)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    spawns = read_counter(g, "/root/spawns")
    time.sleep(1)
    assert read_counter(g, "/root/spawns") > spawns, "the spawner was left frozen"
