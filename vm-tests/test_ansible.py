"""A rolling upgrade with the Ansible collection (ansible/): two guests, ansible-core
from Debian's archive on the host, ssh through forwarded ports, as an operator's fleet."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.probe import free_port
from vmtest.qemu import BootGuest
from vmtest.ssh import authorize_key
from vmtest.workloads import PORT, http, main_pid, start_web_unit

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
ANSIBLE = Path(__file__).resolve().parent.parent / "ansible"


def playbook(collections: Path, inventory: Path, *extra: str) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "seamless.kernel.rolling_upgrade", *extra],
        env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_NOCOLOR": "1",
             "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_STDOUT_CALLBACK": "default"},
        capture_output=True, text=True, timeout=1800)
    out = result.stdout + result.stderr
    print(out)
    return result.returncode, out, time.monotonic() - start


def back_in_new_boot(g: qemu.Guest) -> None:
    """The playbook, not the test bed, moved the guest to a new boot: find its agent there."""
    before = g.info
    assert before is not None
    g.wait_ready(qemu.BOOT_TIMEOUT, not_boot=before.boot_id)


def test_a_rolling_upgrade_of_two_hosts_and_a_rollout_that_stops_at_the_first_failure(
    boot_guest: BootGuest, tmp_path: Path,
) -> None:
    """Two guests with sshd and an HTTP service with state; the playbook upgrades them to
    B one after the other: both come back on B with their service's PID and state, the
    summary lists both. Then a rollout back to A whose first host's restorer fails
    (seamless.fault=restored:fail on its new command line): the play fails with that
    host's reason, and the second host is not touched (still on B)."""
    if shutil.which("ansible-playbook") is None:
        pytest.fail("ansible-playbook is missing (./dev/bootstrap.sh installs ansible-core)")
    collections = tmp_path / "collections"
    subprocess.run(["ansible-galaxy", "collection", "install", "-p", str(collections),
                    str(ANSIBLE)], check=True, capture_output=True)
    hosts, lines = [], []
    for name in ("h1", "h2"):
        port = free_port()
        g = boot_guest("A", forwards={22: port})
        key_dir = tmp_path / name
        key_dir.mkdir()
        key = authorize_key(g, key_dir)
        # enabled, as on a server: the upgrade runs over one of sshd's sessions, so
        # sshd's tree holds the coordinator and is not carried; B starts sshd afresh
        g.run("systemctl", "enable", "--now", "ssh.service")
        web = start_web_unit(g)
        for _ in range(2):
            http(g, PORT, "POST")
        hosts.append((name, g, web))
        lines.append(f"{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
                     f"ansible_ssh_private_key_file={key} "
                     "ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null'")
    inventory = tmp_path / "hosts"
    inventory.write_text("\n".join(lines) + "\n")

    rc, out, seconds = playbook(collections, inventory, "-e", f"seamless_kernel={B.release}",
                                "-e", f'{{"seamless_health_ports": [{PORT}]}}')
    assert rc == 0, out
    record("ansible rolling upgrade of 2 hosts (wall)", seconds)
    summary = out[out.rindex("The rollout so far"):]
    assert summary.count('"result": "upgraded"') == 2, summary
    for name, g, web in hosts:
        back_in_new_boot(g)
        assert g.run("uname", "-r").strip() == B.release, name
        assert main_pid(g, "web.service") == web, name
        assert http(g, PORT) == 2, name

    h2 = hosts[1][1]
    h2_boot = h2.info.boot_id if h2.info else None
    rc, out, _ = playbook(collections, inventory, "-e", f"seamless_kernel={A.release}",
                          "-e", "seamless_upgrade_args='--append seamless.fault=restored:fail'")
    assert rc != 0, out
    assert "fatal: [h1]" in out and "injected fault at restored" in out, out
    assert "[h2]" not in out.split("PLAY RECAP")[0], out
    back_in_new_boot(hosts[0][1])
    assert hosts[0][1].run("uname", "-r").strip() == A.release
    # h2 was left alone: the same boot, on B
    assert h2.run("cat", "/proc/sys/kernel/random/boot_id").strip() == h2_boot
    assert h2.run("uname", "-r").strip() == B.release
