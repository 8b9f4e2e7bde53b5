"""`seamless checkpoint` on a real guest with the collect issue's workloads."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import qemu
from vmtest.log import record
from vmtest.workloads import (
    BIG_MEMORY,
    ECHO_CLIENT,
    ECHO_SERVER,
    HTTP_STATE,
    PIPE_PAIR,
    http,
    memory_report,
    pipe_count,
    prepare_for_criu,
    start_service,
)

pytestmark = pytest.mark.vm

ECHO_PORT = 7007
PORT = 8080


def test_checkpoint_leave_running_and_its_failures(guest_a: qemu.Guest) -> None:
    """256 MiB of known memory, a pipe-joined pair and an HTTP server with state:
    a store too small is refused before anything freezes; checkpoint
    --leave-running keeps all running and writes images that verify; CRIU killed
    mid-dump leaves every process running and answering, and no images behind.
    With room for it, the memory is pre-dumped while they run."""
    g = guest_a
    prepare_for_criu(g)
    big = start_service(g, "big", "python3", "-c", BIG_MEMORY, "/root/big.sum")
    start_service(g, "pair", "/bin/sh", "-c", PIPE_PAIR, "/root/pipe.last")
    start_service(g, "web", "python3", "-c", HTTP_STATE, str(PORT))
    # An established TCP connection to a peer outside the checkpoint (as an ssh
    # session's client is): the echo server is checkpointed, its client is not.
    start_service(g, "echo", "python3", "-c", ECHO_SERVER, str(ECHO_PORT))
    g.sh(f"for i in $(seq 100); do ss -ltn | grep -q :{ECHO_PORT} && exit 0; sleep 0.1; done;"
         " exit 1")
    start_service(g, "echo-client", "python3", "-c", ECHO_CLIENT, str(ECHO_PORT),
                  "/root/echo.count")
    g.sh("for i in $(seq 300); do test -s /root/big.sum && test -s /root/pipe.last && exit 0;"
         " sleep 0.2; done; exit 1")
    for _ in range(3):
        http(g, PORT, "POST")
    memory = memory_report(g, big)
    services = {int(g.run("systemctl", "show", "-P", "MainPID", unit))
                for unit in ("big", "pair", "web")}

    # 0. The plan: the three services are trees to checkpoint, and nothing blocks.
    plan = json.loads(g.run("seamless", "plan", "--images", "/root/ckpt", "--json"))
    assert services <= {t["root"] for t in plan["trees"]}, plan["trees"]
    assert plan["ok"], (plan["problems"], [f for f in plan["findings"] if f["blocking"]])
    assert plan["needed"] > 256 << 20
    # Each service has a cgroup of its own: all three are frozen at the same instant.
    frozen_with = {t["root"]: t["frozen_through_cgroup"] for t in plan["trees"]}
    for unit in ("big", "pair", "web"):
        pid = int(g.run("systemctl", "show", "-P", "MainPID", unit))
        assert frozen_with[pid] == f"/system.slice/{unit}.service", frozen_with

    # 1. The store is too small: refused, nothing frozen, nothing written.
    g.sh("mkdir -p /mnt/small && mount -t tmpfs -o size=64M tmpfs /mnt/small")
    small = g.channel.run(["seamless", "checkpoint", "--images", "/mnt/small/ckpt"])
    assert small.returncode == 1, small.stderr
    assert b"nothing was frozen" in small.stderr
    assert g.run("ls", "-A", "/mnt/small") == ""

    # 2. A checkpoint that leaves everything running.
    result = g.channel.run(["seamless", "checkpoint", "--images", "/root/ckpt",
                            "--leave-running", "--json",
                            "--exclude", "unit:echo-client.service"], timeout=900)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = json.loads(result.stdout)
    assert services <= {t["root"] for t in out["trees"]}
    assert http(g, PORT) == 3 and http(g, PORT, "POST") == 4
    before = pipe_count(g)
    time.sleep(1)
    assert pipe_count(g) > before, "the pipe pair stopped"
    assert memory_report(g, big) == memory
    check = json.loads(g.run("python3", "-c", READ_GENERATION, "/root/ckpt"))
    assert check["order"] == [t["root"] for t in out["trees"]]
    assert check["bad"] == []
    assert g.run("ls", "-d", "/root/ckpt.partial", check=False) == ""
    assert frozen_cgroups(g) == ""
    # The connection was held still for the dump (nftables) and goes on.
    echoed = int(g.run("cat", "/root/echo.count"))
    time.sleep(1)
    assert int(g.run("cat", "/root/echo.count")) > echoed, \
        g.run("systemctl", "status", "echo-client", check=False)
    # /root has room: each tree was pre-dumped while it ran, and its dump holds only
    # what changed since (the 256 MiB are in the pre-dump).
    big_images = g.sh(f"du -sm /root/ckpt/{big}/pre /root/ckpt/{big} | cut -f1").split()
    assert int(big_images[0]) >= 256 and int(big_images[1]) - int(big_images[0]) < 64, \
        big_images
    # Frozen together and thawed together: the same freeze window for every service.
    windows = [t["freeze_seconds"] for t in out["trees"] if t["root"] in services]
    assert max(windows) - min(windows) < 1.0, windows
    for t in out["trees"]:
        record(f"checkpoint: dump of tree {t['command'][:30]} ({t['bytes'] >> 20} MiB)",
               t["dump_seconds"])
        record(f"checkpoint: freeze window of tree {t['command'][:30]}", t["freeze_seconds"])
    record("checkpoint --leave-running, whole command", out["seconds"])

    # 3. CRIU killed in the middle of the dump: everything runs on, no images.
    proc = g.channel.start(["seamless", "checkpoint", "--images", "/root/ckpt2",
                            "--leave-running", "--no-pre-dump"])
    seen = g.channel.run(["sh", "-c", "for i in $(seq 1200); do pgrep -x criu >/dev/null &&"
                          " exit 0; sleep 0.1; done; exit 1"], timeout=300)
    if seen.returncode != 0:
        early = proc.wait(timeout=300)
        pytest.fail(f"CRIU never ran; the checkpoint ended with {early.returncode}: "
                    f"{early.stderr.decode(errors='replace')}")
    time.sleep(0.3)
    g.run("pkill", "-KILL", "-x", "criu")
    killed = proc.wait(timeout=600)
    assert killed.returncode == 1, killed.stderr
    assert g.run("sh", "-c", "ls -d /root/ckpt2* 2>/dev/null || true") == ""
    assert http(g, PORT) == 4
    assert frozen_cgroups(g) == ""
    before = pipe_count(g)
    time.sleep(1)
    assert pipe_count(g) > before, "the pipe pair was left frozen"
    assert memory_report(g, big) == memory


def frozen_cgroups(g: qemu.Guest) -> str:
    """The services' cgroups still frozen (none, unless something was left frozen)."""
    return g.sh("grep -l 1 /sys/fs/cgroup/system.slice/*/cgroup.freeze || true").strip()


READ_GENERATION = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from seamless.memstore.generation import Generation\n"
    "gen = Generation(Path(sys.argv[1]))\n"
    "print(json.dumps({'order': [t.root for t in gen.manifest().trees], 'bad': gen.verify()}))\n"
)
