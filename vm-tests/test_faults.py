"""Faults at every phase of an upgrade: no process lost, none frozen, nothing replayed.

The coordinator fails (an error), is stopped (SIGTERM, as systemd or an operator would)
or dies (SIGKILL, as the OOM killer would) at each phase before the kexec, through
seamless's fault injection (``SEAMLESS_FAULT=POINT:ACTION``, see seamless/faults.py);
then a new kernel left loaded by a coordinator that died is entered with a plain
``systemctl kexec``; then the new kernel refuses the trees (its restorer fails after
the first tree is made, a required command fails) and goes back to the old one.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import main_pid, prepare_for_criu, read_counter, start_counter

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
UNITS = ("count1", "count2")

#: (where, how, extra arguments): each phase before the kexec, each way to end there.
BEFORE_THE_KEXEC = [
    ("preflight", "fail", ()),
    ("pre-dumped", "term", ("--pre-dump",)),
    ("frozen", "kill", ()),
    ("dumped", "term", ()),
    ("dumped", "kill", ()),
    ("sealed", "fail", ()),
    ("entering", "fail", ()),
    ("sealed", "kill", ()),  # last: it leaves B loaded, for the systemctl kexec below
]


def assert_all_run_thawed(g: qemu.Guest, pids: dict[str, int], what: str) -> None:
    """Every workload has its PID, runs (its counter moves) and is not frozen; no CRIU
    is left (a CRIU that lost its coordinator lets its tree go)."""
    state = g.sh(
        "for i in $(seq 150); do "
        "  frozen=$(cat /sys/fs/cgroup/system.slice/count*.service/cgroup.events "
        "| grep -c 'frozen 1' || true); criu=$(pgrep -xc criu || true); "
        '  [ "$frozen" = 0 ] && [ "$criu" = 0 ] && { echo ok; exit 0; }; sleep 0.2; '
        'done; echo "frozen=$frozen criu=$criu"', check=False).strip()
    assert state == "ok", f"{what}: {state}"
    for unit, pid in pids.items():
        assert main_pid(g, unit) == pid, f"{what}: {unit} lost its process"
        before = read_counter(g, f"/root/{unit}")
        time.sleep(0.6)
        assert read_counter(g, f"/root/{unit}") > before, f"{what}: {unit} does not run"


@pytest.mark.long(270)
def test_faults_before_the_kexec_lose_nothing_and_a_dead_coordinator_s_kernel_restores_nothing(
    boot_guest: BootGuest,
) -> None:
    """At each phase before the kexec the upgrade fails, is stopped or is killed: every
    process runs on thawed with its PID, and nothing can be replayed (no upgrade
    record; a failed or stopped upgrade also leaves no generation and no loaded kernel).
    The last, killed after the seal, leaves B loaded: entered by a plain systemctl kexec,
    B refuses to restore its generation (no record of that upgrade), and status says so."""
    g = boot_guest("A")
    prepare_for_criu(g)
    pids = {unit: start_counter(g, unit, f"/root/{unit}") for unit in UNITS}
    outcomes = []
    for where, how, extra in BEFORE_THE_KEXEC:
        start = time.monotonic()
        run = g.channel.run(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes", *extra],
                            env={"SEAMLESS_FAULT": f"{where}:{how}"}, timeout=900)
        what = f"{how} at {where}"
        err = run.stderr.decode(errors="replace")
        # fail: an error (1: nothing changed; 3 once it entered), term: interrupted,
        # kill: the agent sees the signal
        expected = {"fail": (1, 3), "term": (130,), "kill": (-9, 137)}[how]
        assert run.returncode in expected, f"{what}: exit {run.returncode}\n{err}"
        assert_all_run_thawed(g, pids, what)
        store = json.loads(g.run("seamless", "store", "status", "--json"))
        loaded = g.run("cat", "/sys/kernel/kexec_loaded").strip()
        outcomes.append(f"{what}: exit {run.returncode}, {len(store['generations'])} "
                        f"generations, {len(store['partial'])} partial, kernel loaded {loaded}")
        assert g.channel.run(["test", "-e", "/run/seamless/store/upgrade.json"]
                             ).returncode != 0, f"{what}: an upgrade record was left"
        if how != "kill":  # it put everything back itself, and what a killed run left
            assert store["generations"] == [] and store["partial"] == [], f"{what}: {store}"
            assert loaded == "0", f"{what}: the kernel stayed loaded"
        record(f"fault {what}: back to running in", time.monotonic() - start)
    print("\n".join(outcomes))
    last = json.loads(g.run("seamless", "store", "status", "--json"))["generations"]
    assert last and g.run("cat", "/sys/kernel/kexec_loaded").strip() == "1"
    number = last[-1]["number"]

    before = g.info
    assert before is not None
    g.channel.start(["systemctl", "kexec"])
    g.wait_ready(qemu.BOOT_TIMEOUT, not_boot=before.boot_id)
    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state  # the restore is done
    done = g.channel.run(["seamless", "status", "--json"])
    assert done.returncode == 4, done.stderr  # a fleet's rollout stops at this host
    status = json.loads(done.stdout)
    assert status["ok"] is False and status.get("trees") in (None, [])
    assert f"not restoring generation {number}: no upgrade record" in status["error"]
    for unit in UNITS:  # systemctl kexec stopped them; nothing brought an old state back
        assert g.run("systemctl", "is-active", unit, check=False).strip() != "active"


def refused_and_back_on_a(g: qemu.Guest, pids: dict[str, int], reason: str) -> dict[str, Any]:
    """The guest runs A again, every tree with its PID and running, nothing frozen; status
    says B refused them, why, and exits 4; the generation was used up. Its status."""
    assert g.run("uname", "-r").strip() == A.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    assert_all_run_thawed(g, pids, f"back on A ({reason})")
    done = g.channel.run(["seamless", "status", "--json"])
    status: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == 4, status
    assert status["refused"]["release"] == B.release, status
    assert reason in status["refused"]["reason"], status
    assert status["ok"] and sorted(t["pid"] for t in status["trees"]) == sorted(pids.values())
    text = g.channel.run(["seamless", "status"]).out
    assert f"the upgrade to {B.release} was REFUSED there" in text, text
    assert json.loads(g.run("seamless", "store", "status", "--json"))["generations"] == []
    return status


@pytest.mark.long(250)
def test_b_runs_every_tree_or_none_and_goes_back_to_a_with_all_of_them(
    boot_guest: BootGuest,
) -> None:
    """In B the restorer fails once the first tree is made (seamless.fault= on B's
    command line): no tree ran in B, B goes back to A with the same generation, and A
    restores every tree with its PID. Then an upgrade whose required command fails in B
    (--require): back on A again, every tree there."""
    g = boot_guest("A")
    prepare_for_criu(g)
    pids = {unit: start_counter(g, unit, f"/root/{unit}") for unit in UNITS}
    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                                  "--append", "seamless.fault=restored-one:fail"])
    status = refused_and_back_on_a(g, pids, "injected fault at restored-one")
    record("upgrade refused in B, back on A: reboot call to agent ready in A", seconds)
    for name, value in status["phases"].items():
        record(f"refused upgrade (A -> B -> A) phase: {name}", value)

    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                                  "--require", "test -e /etc/seamless-gate"])
    refused_and_back_on_a(g, pids, "the required command `test -e /etc/seamless-gate` exited 1")


def test_criu_killed_while_it_holds_a_tree_and_a_restorer_failing_after_every_tree(
    boot_guest: BootGuest,
) -> None:
    """In A, the coordinator waits with every tree dumped and held; CRIU is killed (as the
    OOM killer would), then the coordinator is stopped: every tree runs on thawed, nothing
    is left in the store. Then the upgrade to B, whose restorer fails once every tree is
    back (seamless.fault=restored:fail): every tree runs with its PID, status says what
    failed and keeps the generation, and a retry by hand restores none a second time."""
    g = boot_guest("A")
    prepare_for_criu(g)
    pids = {unit: start_counter(g, unit, f"/root/{unit}") for unit in UNITS}

    upgrade = g.channel.start(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"],
                              env={"SEAMLESS_FAULT": "dumped:hang"})
    output = b""
    for _, data in upgrade.events(timeout=600):
        output += data
        if b"injected fault at dumped" in output:
            break
    # [e]: the pattern does not match this shell's own command line
    g.sh("pkill -KILL -x criu; sleep 1; pkill -TERM -f 'seamless upgrad[e]'")
    done = upgrade.wait(timeout=300)
    assert done.returncode == 130, done.stderr.decode(errors="replace")
    assert_all_run_thawed(g, pids, "CRIU killed while it held the trees")
    store = json.loads(g.run("seamless", "store", "status", "--json"))
    assert store["generations"] == [] and store["partial"] == [], store
    assert g.run("cat", "/sys/kernel/kexec_loaded").strip() == "0"

    g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                     "--append", "seamless.fault=restored:fail"])
    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    status = json.loads(g.run("seamless", "status", "--json", check=False))
    assert status["ok"] is False and "injected fault at restored" in status["error"]
    assert sorted(t["root"] for t in status["trees"] if t["restored"]) == sorted(pids.values())
    assert status["kept_until"] > time.time()
    for unit in pids:
        before = read_counter(g, f"/root/{unit}")
        time.sleep(0.6)
        assert read_counter(g, f"/root/{unit}") > before, f"{unit} does not run"
    retry = g.channel.run(["seamless", "restore", "--generation", str(status["generation"]),
                           "--json"], env={"SEAMLESS_FAULT": ""}, timeout=600)
    assert retry.returncode == 0, retry.stderr.decode(errors="replace")
    assert all(t["earlier"] for t in json.loads(retry.stdout)["trees"])
    assert json.loads(g.run("seamless", "store", "status", "--json"))["generations"] == []
