"""The restorer of an initramfs-tools initramfs (Debian's default generator): the
processes come back in the initramfs, before init, not in seamless-restore.service."""

from __future__ import annotations

import json
import time

import pytest

from vmtest import config
from vmtest.log import log, record
from vmtest.qemu import BootGuest
from vmtest.workloads import (
    PIPE_PAIR,
    PORT,
    http,
    main_pid,
    pipe_count,
    start_service,
    start_web_unit,
)

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]


def test_upgrade_with_an_initramfs_tools_initramfs_restores_before_init(
    boot_guest: BootGuest,
) -> None:
    """B's initramfs-tools initramfs carries the hook, its scripts and util-linux's
    mount; `seamless upgrade --initrd` into it restores a pipe pair (a transient unit),
    an HTTP server (a unit file, enabled) and a unit started by hand and never enabled
    from the initramfs's init-bottom stage: same PIDs and state, systemd adopts all
    three (the one wanted by nothing too) and starts no second copy, the units are as
    enabled as before, and seamless-restore.service finds the work done."""
    g = boot_guest("A")
    initrd = B.initramfs_tools_initrd
    listing = g.run("lsinitramfs", initrd)
    for path in ("scripts/init-bottom/seamless", "scripts/init-top/seamless",
                 "lib/seamless/seamless-lib.sh", "lib/seamless/kernel-modules",
                 "lib/seamless/bin/mount", "nd_pmem.ko"):
        assert path in listing, f"{path} is not in {initrd}"
    size = int(g.run("stat", "-c", "%s", initrd))
    log.info("initramfs-tools initramfs of B with the restorer: %.1f MiB", size / 2**20)

    pids = {"pair": start_service(g, "pair", "/bin/sh", "-c", PIPE_PAIR, "/root/pipe.last"),
            "web": start_web_unit(g)}
    g.channel.run(["sh", "-c", "cat > /etc/systemd/system/by-hand.service"],
                  input=b"[Service]\nExecStart=/bin/sleep infinity\n", check=True)
    g.run("systemctl", "start", "by-hand.service")
    pids["by-hand"] = main_pid(g, "by-hand.service")
    g.sh("for i in $(seq 100); do test -s /root/pipe.last && exit 0; sleep 0.2; done; exit 1")
    for _ in range(2):
        http(g, PORT, "POST")

    g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--initrd", initrd,
                     "--yes"])

    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state
    kernel_log = g.run("dmesg")
    assert "seamless: restoring generation" in kernel_log
    assert "seamless: restore finished with exit code 0" in kernel_log
    # Each boot's journal has its side: the upgrade's steps in A's (through syslog, synced
    # before the kexec), the restorer's own lines from the initramfs in B's (through the
    # kernel's log: there is no journald in the initramfs).
    journal_a = g.run("journalctl", "-b", "-1", "-t", "seamless", "-o", "cat")
    assert "‣ dumping" in journal_a and f"loading {B.release}" in journal_a, \
        journal_a
    journal_b = g.run("journalctl", "-b", "0", "-t", "seamless", "-o", "cat")
    assert "opening the store" in journal_b, journal_b
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"] and status["stage"] == "initramfs", status
    assert status["from"] == A.release and status["to"] == B.release
    # The unit's condition (no report in /run yet) was false: it did nothing.
    assert g.run("systemctl", "show", "-P", "ConditionResult",
                 "seamless-restore.service").strip() == "no"
    for unit, pid in pids.items():
        assert main_pid(g, unit) == pid, f"{unit} is not its restored process"
    assert http(g, PORT) == 2 and http(g, PORT, "POST") == 3
    before = pipe_count(g)
    time.sleep(1)
    assert pipe_count(g) > before, "the pipe pair does not run"
    servers = g.run("pgrep", "-c", "-f", "/usr/local/lib/web.py").strip()
    assert servers == "1", f"{servers} HTTP servers: systemd started a second copy"
    # Wanted by this boot only until seamless-adopted.service has run.
    g.sh("for i in $(seq 150); do systemctl is-active -q seamless-adopted.service || exit 0;"
         " sleep 0.2; done; exit 1")
    assert g.run("systemctl", "is-enabled", "by-hand.service", check=False).strip() \
        in ("disabled", "static")
    assert g.run("systemctl", "is-enabled", "web.service").strip() == "enabled"
    for name, value in status["phases"].items():
        record(f"initramfs-tools upgrade phase: {name}", value)
    # What was restored before init can be checkpointed again: its files are on the
    # running system's mounts (/dev/null, sockets in /run), not on detached ones.
    again = g.channel.run(["seamless", "checkpoint", "--leave-running", "--no-pre-dump",
                           "--json"], timeout=600)
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    assert {t["root"] for t in json.loads(again.stdout)["trees"]} >= set(pids.values())


#: Appends a count to a file of its working directory, twice a second, holding it open.
APPENDER = 'exec 3>>count; n=0; while :; do n=$((n+1)); echo $n >&3; sleep 0.5; done'


def test_a_tree_on_a_filesystem_of_its_own_in_fstab_comes_back_after_switch_root(
    boot_guest: BootGuest,
) -> None:
    """/srv/data is a filesystem of its own in fstab (a loop-mounted image here), which
    the boot mounts only after init: a tree working there is not restored before init,
    where only the root is mounted, but with the others by seamless-restore.service once
    local-fs.target has it. The upgrade saw it coming: the initramfs started no restorer
    only to find that out. The tree keeps its PID and its open file."""
    g = boot_guest("A")
    g.sh("truncate -s 32M /var/lib/srv.img && mkfs.ext4 -q /var/lib/srv.img"
         " && mkdir -p /srv/data && echo '/var/lib/srv.img /srv/data ext4 loop 0 0'"
         " >> /etc/fstab && systemctl daemon-reload && mount /srv/data")
    pids = {"ondisk": start_service(g, "ondisk", "-p", "WorkingDirectory=/srv/data",
                                    "/bin/sh", "-c", APPENDER),
            "web": start_web_unit(g)}
    http(g, PORT, "POST")
    plan = json.loads(g.run("seamless", "plan", "--json"))
    assert plan["ok"], plan["findings"]

    g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--initrd",
                     B.initramfs_tools_initrd, "--yes"])

    assert g.run("uname", "-r").strip() == B.release
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"] and status["stage"] == "systemd", status
    assert "ondisk.service: its files on /srv/data, mounted after init" in \
        status["deferred"], status
    kernel_log = g.run("dmesg")
    assert "after switch-root, as the upgrade planned" in kernel_log, kernel_log
    assert "seamless: restoring generation" not in kernel_log, kernel_log
    for unit, pid in pids.items():
        assert main_pid(g, unit) == pid, f"{unit} is not its restored process"
    g.run("findmnt", "/srv/data")
    count = "tail -n 1 /srv/data/count"
    before = int(g.sh(count))
    time.sleep(1.5)
    assert int(g.sh(count)) > before, "the tree on /srv/data does not run"
    assert http(g, PORT) == 1
    for name, value in status["phases"].items():
        record(f"upgrade with a tree on an fstab filesystem, phase: {name}", value)
