"""The operator's own ssh session survives `seamless upgrade`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vmtest import config
from vmtest.log import record
from vmtest.probe import free_port
from vmtest.qemu import BootGuest
from vmtest.ssh import Session, authorize_key
from vmtest.workloads import main_pid

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]


def test_an_established_ssh_session_keeps_working_across_the_upgrade(
    boot_guest: BootGuest, tmp_path: Path,
) -> None:
    """sshd (Debian's ssh.service) runs in A; the host opens one ssh session through a
    forwarded port and sets a shell variable in it; `seamless upgrade` to B; the same
    connection (the same ssh client process) then runs commands in the same shell,
    which still has the variable, and sshd runs as the same PID under ssh.service."""
    port = free_port()
    g = boot_guest("A", forwards={22: port})
    g.run("seamless", "store", "format")
    key = authorize_key(g, tmp_path)
    g.run("systemctl", "start", "ssh.service")
    sshd = main_pid(g, "ssh.service")

    with Session(port, key) as session:
        session.send("X=41; echo ready-$((X + 1)) $$")
        shell = int(session.expect("ready-42").rsplit("ready-42 ", 1)[1].split()[0])
        # a logind session, as on a standard server: its scope, and the pipe sshd holds
        assert "/session-" in g.run("cat", f"/proc/{shell}/cgroup")
        plan = g.run("seamless", "plan")
        assert "a named pipe opened in another mount namespace" in plan, plan

        g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"])

        assert g.run("uname", "-r").strip() == B.release
        sent = time.monotonic()
        session.send("echo after-$X $$ $(uname -r)")
        # The peer (QEMU's user network here) resends after its backoff: it can take a while.
        out = session.expect(f"after-41 {shell} {B.release}", timeout=400)
        assert session.proc.poll() is None, out
        record("ssh session: first answer after the upgrade, from the command sent",
               time.monotonic() - sent)

    state = g.channel.run(["systemctl", "is-system-running", "--wait"], timeout=300)
    assert state.out.strip() in ("running", "degraded"), state.out
    assert json.loads(g.run("seamless", "status", "--json"))["ok"]
    assert main_pid(g, "ssh.service") == sshd
    assert g.run("systemctl", "is-active", "ssh.service").strip() == "active"
    assert g.run("pgrep", "-c", "-x", "sshd").strip() != "0"
