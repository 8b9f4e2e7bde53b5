"""`seamless upgrade`: the collect issue's workloads come back in kernel B, whole."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import (
    BIG_MEMORY,
    PIPE_PAIR,
    PORT,
    http,
    main_pid,
    memory_report,
    pipe_count,
    start_service,
    start_web_unit,
)

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
#: The 256 MiB workload's images need more than the default 256 MiB region.
REGION = "512M!1G"

def prepare(g: qemu.Guest) -> dict[str, int]:
    pids = {
        "big": start_service(g, "big", "python3", "-c", BIG_MEMORY, "/root/big.sum"),
        "pair": start_service(g, "pair", "/bin/sh", "-c", PIPE_PAIR, "/root/pipe.last"),
        "web": start_web_unit(g),
    }
    g.sh("for i in $(seq 300); do test -s /root/big.sum && test -s /root/pipe.last && exit 0;"
         " sleep 0.2; done; exit 1")
    for _ in range(3):
        http(g, PORT, "POST")
    return pids


def test_upgrade_brings_the_workloads_back_in_b_with_their_state(
    boot_guest: BootGuest,
) -> None:
    """256 MiB of known memory, a pipe-joined pair and an HTTP server with state (its
    own unit file, enabled) run in A; `seamless upgrade --kernel B` checkpoints them,
    kexecs, and restores them in B: same PIDs, same memory checksum, the pipe still
    carries data, the server returns its state, systemd shows each service with its
    original PID and started no second copy; the store's generation is wiped."""
    g = boot_guest("A", region=REGION)
    pids = prepare(g)
    memory = memory_report(g, pids["big"])
    before_pipe = pipe_count(g)

    dry = g.channel.run(["seamless", "upgrade", "--kernel", B.vmlinuz, "--dry-run", "--json"],
                        timeout=900)
    assert dry.returncode == 0, dry.stderr.decode(errors="replace")
    assert set(pids.values()) <= {t["root"] for t in json.loads(dry.stdout)["trees"]}
    assert http(g, PORT) == 3, "the dry run did not thaw the server"

    # through dracut's initramfs (the restore after switch-root): /boot's is the default
    # generator's, initramfs-tools', on Debian 13 (test_initramfs_tools tries it)
    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--initrd",
                                  B.dracut_initrd, "--yes"])

    assert g.run("uname", "-r").strip() == B.release
    # the root filesystem, busy, was frozen before the kexec: B mounts it clean, without
    # replaying its journal (7 s of the blackout under TCG), neither the kernel at mount
    # nor e2fsck in the initramfs
    boot_log = g.run("dmesg") + g.run("journalctl", "-b", "-o", "cat", "--no-pager")
    replayed = [line for line in boot_log.splitlines()
                if "recovery complete" in line or "recovering journal" in line]
    assert not replayed, replayed
    state = g.settled()
    assert state in ("running", "degraded"), state
    for unit, pid in pids.items():
        assert main_pid(g, unit) == pid, f"{unit} is not its restored process"
        assert g.run("systemctl", "is-active", unit).strip() == "active"
    assert http(g, PORT) == 3 and http(g, PORT, "POST") == 4
    assert memory_report(g, pids["big"]) == memory
    after = pipe_count(g)
    assert after >= before_pipe
    time.sleep(1)
    assert pipe_count(g) > after, "the pipe pair does not run"
    servers = g.run("pgrep", "-c", "-f", "/usr/local/lib/web.py").strip()
    assert servers == "1", f"{servers} HTTP servers: systemd started a second copy"

    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"] and status["from"] == A.release and status["to"] == B.release
    assert {t["root"] for t in status["trees"]} >= set(pids.values())
    assert json.loads(g.run("seamless", "store", "status", "--json"))["generations"] == []
    for name, value in status["phases"].items():
        record(f"upgrade phase: {name}", value)
    record("upgrade: reboot call to agent ready in B", seconds)

    # systemctl stop stops the restored service; it does not come back by itself.
    g.run("systemctl", "stop", "web.service")
    assert g.run("pgrep", "-c", "-f", "/usr/local/lib/web.py", check=False).strip() == "0"


FLIP_FIRST_BYTE = ("import sys\n"
                   "with open(sys.argv[1], 'r+b') as f:\n"
                   "    b = f.read(1); f.seek(0); f.write(bytes([b[0] ^ 0xff]))\n")


def test_a_corrupt_image_fails_its_tree_only_and_a_retry_by_hand_restores_it(
    boot_guest: BootGuest,
) -> None:
    """The workloads are checkpointed in A, one image of the pipe pair is corrupted, then
    the guest kexecs into B to restore that generation: the pair is reported failed, the
    others are back, the boot reaches multi-user, the images are kept for a retry. With
    the byte put back, `seamless restore --generation N` brings the pair back (same PIDs,
    its pipe running), leaves the running trees alone and wipes the generation."""
    g = boot_guest("A", region=REGION)
    pids = prepare(g)
    memory = memory_report(g, pids["big"])
    out = json.loads(g.run("seamless", "checkpoint", "--json", timeout=900))
    number = out["generation"]
    images = out["images"]
    pair_dir = f"{images}/{pids['pair']}"
    victim = g.sh(f"ls {pair_dir} | grep '^pages-' | head -1").strip()
    g.run("python3", "-c", FLIP_FIRST_BYTE, f"{pair_dir}/{victim}")

    g.seamless_kexec(B, "--restore-generation", str(number))

    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    status = json.loads(g.run("seamless", "status", "--json", check=False))
    assert not status["ok"]
    trees = {t["root"]: t for t in status["trees"]}
    assert not trees[pids["pair"]]["restored"]
    assert f"{pids['pair']}/{victim}" in trees[pids["pair"]]["error"]
    assert trees[pids["big"]]["restored"] and trees[pids["web"]]["restored"]
    assert main_pid(g, "big") == pids["big"] and main_pid(g, "web") == pids["web"]
    assert memory_report(g, pids["big"]) == memory
    assert http(g, PORT) == 3
    text = g.run("seamless", "status", check=False)
    assert "FAILED" in text and "corrupt images" in text
    kept = json.loads(g.run("seamless", "store", "status", "--json"))["generations"]
    assert [gen["number"] for gen in kept] == [number], "the failed generation was not kept"

    # The retry by hand, once the image is whole again (the store is mounted by then).
    g.run("seamless", "store", "status")
    g.run("python3", "-c", FLIP_FIRST_BYTE, f"{pair_dir}/{victim}")
    retry = g.channel.run(["seamless", "restore", "--generation", str(number), "--json"],
                          timeout=600)
    assert retry.returncode == 0, retry.stderr.decode(errors="replace")
    trees = {t["root"]: t for t in json.loads(retry.stdout)["trees"]}
    assert trees[pids["pair"]]["restored"] and not trees[pids["pair"]]["earlier"]
    assert trees[pids["big"]]["earlier"] and trees[pids["web"]]["earlier"]
    assert main_pid(g, "pair") == pids["pair"], "systemd does not show the restored pair"
    before = pipe_count(g)
    time.sleep(1)
    assert pipe_count(g) > before, "the restored pipe pair does not run"
    assert main_pid(g, "big") == pids["big"] and http(g, PORT) == 3
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"] and "retry by hand (seamless restore)" in status["phases"]
    record("retry by hand of the failed tree", status["phases"]["retry by hand (seamless restore)"])
    assert json.loads(g.run("seamless", "store", "status", "--json"))["generations"] == []
