"""`seamless plan` on a real Debian guest: which trees, which left out, and why."""

from __future__ import annotations

import json

import pytest

from vmtest import qemu

pytestmark = pytest.mark.vm


def test_plan_lists_workloads_and_leaves_out_plumbing(guest_a: qemu.Guest) -> None:
    """A pipe-joined pair started as a transient service is one tree; journald,
    udevd and the getty are plumbing; the agent running seamless is left out."""
    guest_a.run(
        "systemd-run", "--unit=pair", "--property=Type=exec", "/bin/sh", "-c",
        "yes | sleep 1000",
    )
    guest_a.sh("for i in $(seq 50); do pgrep -x sleep && exit 0; sleep 0.2; done; exit 1")
    shell_pid = int(guest_a.run("systemctl", "show", "-P", "MainPID", "pair.service"))
    pair = {int(p) for p in guest_a.run("pgrep", "-P", str(shell_pid)).split()}
    assert len(pair) == 2  # yes and sleep

    # Without the test bed's config (which excludes the agent's unit outright), so the
    # agent is left out for running the seamless command.
    result = guest_a.channel.run(["seamless", "plan", "--json", "--config", "/nonexistent"])
    plan = json.loads(result.stdout)

    trees = {t["root"]: t for t in plan["trees"]}
    assert shell_pid in trees, trees
    assert trees[shell_pid]["unit"] == "pair.service"
    assert set(trees[shell_pid]["pids"]) == pair | {shell_pid}
    excluded = {e["pid"]: e for e in plan["excluded"]}
    journald = int(guest_a.run("systemctl", "show", "-P", "MainPID", "systemd-journald"))
    assert excluded[journald]["restarted"] is True
    agent = int(guest_a.run("systemctl", "show", "-P", "MainPID", "seamless-vm-agent"))
    assert "runs this seamless command" in excluded[agent]["reason"]
    assert excluded[1]["reason"].startswith("PID 1")
    # Nothing in the plan may be a kernel thread.
    kthreads = set(map(int, guest_a.run("pgrep", "-P", "2").split()))
    assert not kthreads & {pid for t in plan["trees"] for pid in t["pids"]}
    # The package's seamless-arm.service made the store at boot: nothing blocks.
    assert result.returncode == 0, plan["problems"]
    assert plan["ok"] is True and plan["store"]["free"] > 0, plan["store"]
