"""A rolling upgrade with the Ansible collection (ansible/): two guests, ansible-core
from Debian's archive on the host, ssh through forwarded ports, as an operator's fleet."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmtest import config
from vmtest.fleet import back_in_new_boot, install_collection, inventory, playbook, prepare
from vmtest.log import record
from vmtest.probe import free_port
from vmtest.qemu import BootGuest
from vmtest.workloads import PORT, http, main_pid

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
ROLLOUT = "seamless.kernel.rolling_upgrade"


@pytest.mark.long(500)
def test_a_rolling_upgrade_of_two_hosts_and_a_rollout_that_stops_at_the_first_failure(
    boot_guest: BootGuest, tmp_path: Path,
) -> None:
    """Two guests with sshd and an HTTP service with state; the playbook upgrades them to
    B one after the other: both come back on B with their service's PID and state, the
    summary lists both. Then a rollout back to A whose first host's restorer fails
    (seamless.fault=restored:fail on its new command line): the play fails with that
    host's reason, and the second host is not touched (still on B)."""
    collections = install_collection(tmp_path / "collections")
    hosts = []
    for name in ("h1", "h2"):
        port = free_port()
        hosts.append(prepare(name, boot_guest("A", forwards={22: port}), port, tmp_path / name))
    hosts_file = inventory(hosts, tmp_path / "hosts")

    rc, out, seconds = playbook(collections, hosts_file, ROLLOUT,
                                "-e", f"seamless_kernel={B.release}",
                                "-e", f'{{"seamless_health_ports": [{PORT}]}}')
    assert rc == 0, out
    record("ansible rolling upgrade of 2 hosts (wall)", seconds)
    summary = out[out.rindex("The rollout so far"):]
    assert summary.count('"result": "upgraded"') == 2, summary
    for h in hosts:
        back_in_new_boot(h.guest)
        assert h.guest.run("uname", "-r").strip() == B.release, h.name
        assert main_pid(h.guest, "web.service") == h.web, h.name
        assert http(h.guest, PORT) == 2, h.name

    h1, h2 = hosts[0].guest, hosts[1].guest
    h2_boot = h2.info.boot_id if h2.info else None
    rc, out, _ = playbook(collections, hosts_file, ROLLOUT, "-e", f"seamless_kernel={A.release}",
                          "-e", "seamless_upgrade_args='--append seamless.fault=restored:fail'")
    assert rc != 0, out
    assert "fatal: [h1]" in out and "injected fault at restored" in out, out
    assert "[h2]" not in out.split("PLAY RECAP")[0], out
    back_in_new_boot(h1)
    assert h1.run("uname", "-r").strip() == A.release
    # h2 was left alone: the same boot, on B
    assert h2.run("cat", "/proc/sys/kernel/random/boot_id").strip() == h2_boot
    assert h2.run("uname", "-r").strip() == B.release
