"""Restoring on a real guest (same kernel): dumped, gone, back with the same PIDs."""

from __future__ import annotations

import json

import pytest

from vmtest import qemu
from vmtest.log import record
from vmtest.workloads import prepare_for_criu, read_counter, start_counter

pytestmark = pytest.mark.vm


#: Dump the trees of the given PIDs and let CRIU end them (as a kexec would).
DUMP = r"""
import dataclasses, json, sys
from pathlib import Path
from seamless.collect import checkpoint
from seamless.criu import Criu
from seamless.collect.processes import read_table, ProcessTree, children_map, descendants
from seamless.collect.resources import journald_streams, unix_sockets

table = {p.pid: p for p in read_table()}
kids = children_map(table.values())
trees = [ProcessTree(table[pid], [table[pid], *descendants(pid, kids)])
         for pid in map(int, sys.argv[2:])]
sockets = unix_sockets() or {}
def options(tree):
    opts = checkpoint.dump_options(tree, journald_streams(tree.pids, sockets))
    return dataclasses.replace(opts, leave_running=False)
held = checkpoint.dump_all(trees, Path(sys.argv[1]), Criu(timeout=600), options=options)
held.release()
print(json.dumps([d.dump_seconds for d in held.dumps]))
"""


def test_trees_come_back_with_their_pids_state_and_cgroups(guest_a: qemu.Guest) -> None:
    prepare_for_criu(guest_a)
    pids = [start_counter(guest_a, f"counter{i}", f"/root/counter{i}") for i in range(2)]

    dumped = json.loads(guest_a.run("python3", "-c", DUMP, "/root/gen", *map(str, pids)))
    for pid in pids:
        assert guest_a.channel.run(["kill", "-0", str(pid)]).returncode != 0, "still running"
    at_dump = [read_counter(guest_a, f"/root/counter{i}") for i in range(2)]

    report = json.loads(guest_a.run("seamless", "restore", "--images", "/root/gen", "--json"))

    assert report["ok"], report
    assert [t["pid"] for t in report["trees"]] == pids
    guest_a.sh("sleep 1.5")
    for i, pid in enumerate(pids):
        count = read_counter(guest_a, f"/root/counter{i}")
        assert count > at_dump[i], "the restored counter does not count"
        assert count < at_dump[i] + 50, "the counter started over instead of going on"
        cgroup = guest_a.run("cat", f"/proc/{pid}/cgroup").strip()
        assert cgroup.endswith(f"/system.slice/counter{i}.service"), cgroup
    # Its stdout, a stream to journald before, is a new journal stream now.
    journal = guest_a.run("journalctl", "-o", "cat", f"_PID={pids[0]}", "--no-pager")
    assert f"count {at_dump[0] + 1}" in journal or f"count {at_dump[0] + 2}" in journal, journal
    for seconds in dumped:
        record("dump of a counter tree", seconds)
    for t in report["trees"]:
        record("restore of a counter tree", t["seconds"])
