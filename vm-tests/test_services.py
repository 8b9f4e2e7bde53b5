"""`seamless upgrade` on real services from Debian's archive: redis, tmux, and a counter."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import (
    BIG_MEMORY,
    memory_report,
    read_counter,
    start_counter,
    start_service,
)

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
KEYS = 100_000
REGION = "512M!1G"

LOAD_KEYS = (
    f"python3 -c 'for i in range({KEYS}): print(f\"SET key:{{i}} value-{{i}}\")'"
    " | redis-cli --pipe"
)


def start_redis(g: qemu.Guest) -> int:
    """redis-server with persistence off, as a service, holding KEYS keys in memory."""
    g.run("systemd-run", "--unit=kv", "redis-server", "--port", "6379", "--save", "",
          "--appendonly", "no", "--daemonize", "no")
    g.sh("for i in $(seq 100); do redis-cli ping 2>/dev/null | grep -q PONG && exit 0;"
         " sleep 0.2; done; exit 1")
    g.sh(LOAD_KEYS, timeout=300)
    assert g.run("redis-cli", "dbsize").strip() == str(KEYS)
    return int(g.run("systemctl", "show", "-P", "MainPID", "kv"))


def start_tmux(g: qemu.Guest) -> int:
    """A tmux session (its server a service of its own) with typed commands and output."""
    g.run("systemd-run", "--unit=tmux", "--property=Type=forking", "--setenv=HOME=/root",
          "tmux", "new-session", "-d", "-s", "work", "-x", "120", "-y", "40")
    for command in ("echo scrollback-before-upgrade", "export SEAMLESS_MARK=kept"):
        g.run("tmux", "send-keys", "-t", "work", command, "Enter")
    g.sh("for i in $(seq 50); do tmux capture-pane -p -t work | grep -q '^scrollback-before'"
         " && exit 0; sleep 0.2; done; exit 1")
    return int(g.run("systemctl", "show", "-P", "MainPID", "tmux"))


@pytest.mark.debian12
def test_redis_tmux_and_a_counter_survive_the_upgrade(boot_guest: BootGuest) -> None:
    """redis with 100,000 keys, a tmux session with typed history and scrollback, a
    counter advancing every 200 ms and a process holding 256 MiB: after `seamless
    upgrade` to B every key is there under the same PID, the session is attachable with
    its scrollback and history, the counter goes on from where it stopped, the memory is
    identical; uname is B and systemd started nothing twice."""
    g = boot_guest("A", region=REGION)
    redis = start_redis(g)
    tmux = start_tmux(g)
    counter = start_counter(g, "counter", "/root/count")
    big = start_service(g, "big", "python3", "-c", BIG_MEMORY, "/root/big.sum")
    g.sh("for i in $(seq 300); do test -s /root/big.sum && exit 0; sleep 0.2; done; exit 1")
    memory = memory_report(g, big)

    before = read_counter(g, "/root/count")

    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                                  "--json"])

    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    # redis: same process, every key.
    assert int(g.run("systemctl", "show", "-P", "MainPID", "kv")) == redis
    assert g.run("redis-cli", "dbsize").strip() == str(KEYS)
    assert g.run("redis-cli", "get", f"key:{KEYS - 1}").strip() == f"value-{KEYS - 1}"
    assert g.run("pgrep", "-c", "-x", "redis-server").strip() == "1"
    # tmux: the same server, the session attachable, scrollback and shell state kept.
    assert int(g.run("systemctl", "show", "-P", "MainPID", "tmux")) == tmux
    g.run("tmux", "has-session", "-t", "work")
    assert "scrollback-before-upgrade" in g.run("tmux", "capture-pane", "-p", "-S", "-100",
                                                "-t", "work")
    g.run("tmux", "send-keys", "-t", "work", "echo mark=$SEAMLESS_MARK; history | tail -3",
          "Enter")
    g.sh("for i in $(seq 50); do tmux capture-pane -p -t work | grep -q '^mark=kept'"
         " && exit 0; sleep 0.2; done; exit 1")
    assert "echo scrollback-before-upgrade" in g.run("tmux", "capture-pane", "-p", "-t",
                                                     "work")
    # The counter goes on from where it stopped (a restarted one would count from 0).
    assert int(g.run("systemctl", "show", "-P", "MainPID", "counter")) == counter
    after = read_counter(g, "/root/count")
    assert after >= before
    time.sleep(1)
    assert read_counter(g, "/root/count") > after
    assert memory_report(g, big) == memory
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"], status
    # what `upgrade --json` printed as A entered B, kept for this boot
    said = status["upgrade"]
    assert said["state"] == "entering" and said["to"] == B.release, said
    assert {t["root"] for t in said["trees"]} >= {redis, tmux, counter, big}
    for name, value in status["phases"].items():
        record(f"services upgrade phase: {name}", value)
    record("services upgrade: reboot call to agent ready in B", seconds)


#: Kill the CRIU of the first tree dumped, as it holds the tree (post-dump) while the next
#: is dumped. Not a CRIU in the middle of a dump: one killed while its code is injected in
#: a process (compel's parasite, or a syscall it makes the process run) can take that
#: process with it, whatever seamless does after.
KILL_A_HOLDING_CRIU = (
    "for i in $(seq 2400); do"
    "  for log in /run/seamless/store/generations/*.partial/*/dump.log; do"
    "    grep -qs 'Running post-dump scripts' \"$log\" && break 2;"
    "  done; sleep 0.05; done;"
    "for p in $(pgrep -x criu); do"
    "  if ls -l /proc/$p/fd 2>/dev/null | grep -qF \"$log\"; then"
    "    kill -KILL $p && echo \"$p $log\" && exit 0;"
    "  fi; done; exit 1"
)


def assert_unchanged(g: qemu.Guest, redis: int, tmux: int) -> None:
    assert int(g.run("systemctl", "show", "-P", "MainPID", "kv")) == redis
    assert g.run("redis-cli", "dbsize").strip() == str(KEYS), "redis does not answer"
    g.run("tmux", "has-session", "-t", "work")
    status = json.loads(g.run("seamless", "store", "status", "--json"))
    assert status["generations"] == [] and status["partial"] == [], status
    assert g.run("cat", "/sys/kernel/kexec_loaded").strip() == "0", "a kernel stayed loaded"


def test_failed_upgrades_change_nothing(boot_guest: BootGuest) -> None:
    """With redis and tmux running: a missing or invalid target kernel is refused before
    anything is frozen (exit 1); a CRIU killed in the middle of the upgrade's checkpoint,
    while it holds its tree, stops the upgrade before the kexec (the tree ran on after
    its dump), and leaves every process running and answering, no generation and no
    kernel loaded."""
    g = boot_guest("A")
    redis = start_redis(g)
    tmux = start_tmux(g)
    for kernel in ("/boot/vmlinuz-missing", "/etc/hostname"):
        refused = g.channel.run(["seamless", "upgrade", "--kernel", kernel, "--yes"])
        assert refused.returncode == 1, refused.stderr
        assert b"Traceback" not in refused.stderr
        assert_unchanged(g, redis, tmux)

    # Without a pre-dump: the kill must hit the dump (a killed pre-dump only costs time,
    # the trees are then dumped whole and the upgrade goes on).
    proc = g.channel.start(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                            "--no-pre-dump"])
    kill = g.channel.run(["sh", "-c", KILL_A_HOLDING_CRIU], timeout=300)
    killed = proc.wait(timeout=600)
    assert kill.returncode == 0, (kill.out, killed.stderr)
    assert killed.returncode == 1, killed.stderr
    assert b"CRIU let go of tree" in killed.stderr, killed.stderr
    assert g.run("uname", "-r").strip() == A.release
    assert_unchanged(g, redis, tmux)
