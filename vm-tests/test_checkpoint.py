"""Checkpointing on a real guest: every tree dumped by CRIU and held frozen together."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import qemu
from vmtest.log import record
from vmtest.workloads import prepare_for_criu, read_counter, start_counter

pytestmark = pytest.mark.vm


#: Dump the trees of the PIDs given, report, hold until a line on stdin, release.
HOLD = r"""
import json, sys
from pathlib import Path
import psutil
from seamless.collect.checkpoint import dump_all
from seamless.collect.criu import Criu
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
