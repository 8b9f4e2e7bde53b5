"""The operator's own ssh session survives `seamless upgrade`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from vmtest import config
from vmtest.errors import VMError
from vmtest.log import record
from vmtest.probe import free_port
from vmtest.qemu import BootGuest, Guest
from vmtest.ssh import Session, authorize_key
from vmtest.workloads import main_pid

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]


@pytest.mark.debian12
def test_an_established_ssh_session_keeps_working_across_the_upgrade(
    boot_guest: BootGuest, tmp_path: Path,
) -> None:
    """sshd (Debian's ssh.service) runs in A; the host opens one ssh session through a
    forwarded port and sets a shell variable in it; `seamless upgrade` to B; the same
    connection (the same ssh client process) then runs commands in the same shell,
    which still has the variable, and sshd runs as the same PID under ssh.service."""
    port = free_port()
    g = boot_guest("A", forwards={22: port})
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

        started = time.monotonic()
        g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes"])
        back = time.monotonic()

        assert g.run("uname", "-r").strip() == B.release
        sent = time.monotonic()
        session.send("echo after-$X $$ $(uname -r)")
        # The peer (QEMU's user network here) resends after its backoff: it can take a while.
        try:
            out = session.expect(f"after-41 {shell} {B.release}", timeout=400)
        except VMError as e:
            raise VMError(f"{e}\n{why_it_ended(g, session, started, back)}") from None
        assert session.proc.poll() is None, out
        record("ssh session: first answer after the upgrade, from the command sent",
               time.monotonic() - sent)

    # The connection was locked again before its address came up in B (restore/netlock.py).
    restore_log = g.run("journalctl", "-b", "--no-pager", "-u", "seamless-restore.service")
    assert re.search(r"locked the \d+ TCP connections of tree \d+ again", restore_log), \
        restore_log
    state = g.settled()
    assert state in ("running", "degraded"), state
    assert json.loads(g.run("seamless", "status", "--json"))["ok"]
    assert main_pid(g, "ssh.service") == sshd
    assert g.run("systemctl", "is-active", "ssh.service").strip() == "active"
    assert g.run("pgrep", "-c", "-x", "sshd").strip() != "0"


def why_it_ended(g: Guest, session: Session, started: float, back: float) -> str:
    """When the session ended against the upgrade, and what B's journal says about it."""
    ended = ("still open" if session.ended is None
             else f"ended {session.ended - started:.1f} s after the upgrade began")
    logs = g.channel.run(["sh", "-c",
                          "journalctl -b -o short-monotonic --no-pager -u ssh.service"
                          " -u seamless-restore.service -u systemd-networkd.service"
                          " | tail -n 60; dmesg | tail -n 30"], timeout=60)
    return (f"ssh session {ended}; the agent answered in B {back - started:.1f} s after it"
            f" began\n{logs.out}")
