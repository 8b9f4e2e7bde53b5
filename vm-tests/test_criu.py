"""The CRIU engine on a real guest: our RPC client drives Debian's CRIU (3.17 in 12,
4.1 in 13)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from vmtest import config, qemu
from vmtest.log import log, record
from vmtest.workloads import prepare_for_criu

pytestmark = pytest.mark.vm

#: Run by the guest's python3 with the seamless package installed: one CRIU call,
#: its result as JSON on stdout (a CriuError is the message on stderr, exit 1).
CLIENT = r"""
import json, sys
from pathlib import Path
from seamless.criu import Criu, CriuError, CriuOptions

criu = Criu(timeout=600)
command, args = sys.argv[1], sys.argv[2:]
try:
    if command == "check":
        work = Path(args[0])
        work.mkdir(parents=True, exist_ok=True)
        result = criu.check(work)
        out = {"version": str(criu.version()), "seconds": result.seconds}
    elif command in ("dump", "pre-dump"):
        images = Path(args[1])
        images.mkdir(parents=True, exist_ok=True)
        options = CriuOptions(pid=int(args[0]), **json.loads(args[2]))
        handled = []
        call = criu.dump if command == "dump" else criu.pre_dump
        result = call(images, options,
                      on_notify={"post-dump": lambda n: handled.append(n.script)})
        out = {"seconds": result.seconds, "handled": handled,
               "scripts": [n.script for n in result.notifications],
               "bytes": sum(f.stat().st_size for f in images.iterdir())}
    elif command == "restore":
        result = criu.restore(Path(args[0]), CriuOptions(**json.loads(args[1])))
        out = {"seconds": result.seconds, "pid": result.pid,
               "scripts": [n.script for n in result.notifications]}
except CriuError as e:
    sys.exit(e.format_message())
print(json.dumps(out))
"""

#: 64 MiB of random bytes; on SIGUSR1 (and once at start) it writes its PID, how
#: many times it reported and the SHA-256 of that memory to STATE/sum.
WORKLOAD = r"""
import hashlib, os, signal, sys
state = sys.argv[1]
memory = bytearray(os.urandom(64 << 20))
reports = 0
def report(*_):
    global reports
    reports += 1
    with open(state + "/sum.tmp", "w") as f:
        f.write(f"{os.getpid()} {reports} {hashlib.sha256(memory).hexdigest()}\n")
    os.rename(state + "/sum.tmp", state + "/sum")
signal.signal(signal.SIGUSR1, report)
report()
while True:
    signal.pause()
"""



def client(guest: qemu.Guest, *args: str, **options: object) -> dict[str, Any]:
    """One call of our client in the guest; ``options`` are CriuOptions fields."""
    argv = [*args, json.dumps(options)] if args[0] != "check" else list(args)
    out = guest.run("python3", "-c", CLIENT, *argv)
    result: dict[str, Any] = json.loads(out)
    return result


def start_workload(guest: qemu.Guest, state: str) -> tuple[int, str]:
    """Start WORKLOAD in its own session, stdio on /dev/null; its PID and checksum."""
    prepare_for_criu(guest)
    guest.run(
        "/bin/sh", "-ec",
        'mkdir -p "$2"; setsid -f python3 -c "$1" "$2" </dev/null >/dev/null 2>&1',
        "start", WORKLOAD, state,
    )
    return wait_report(guest, state, 1)


def wait_report(guest: qemu.Guest, state: str, reports: int) -> tuple[int, str]:
    """Wait for the workload's report number ``reports``; its PID and checksum."""
    line = guest.sh(
        f"for i in $(seq 300); do "
        f"  if [ -e {state}/sum ] && [ $(cut -d' ' -f2 {state}/sum) -ge {reports} ]; then "
        f"    cat {state}/sum; exit 0; fi; sleep 0.2; done; exit 1"
    )
    pid, count, digest = line.split()
    assert int(count) == reports, line
    return int(pid), digest


def test_criu_dumps_and_restores_a_64mib_process_with_its_pid_and_memory(
    guest_a: qemu.Guest,
) -> None:
    """criu check passes; a process holding 64 MiB of known memory is dumped by
    our client (post-dump notification handled, the process gone), restored with
    the same PID, and it runs again with its memory's checksum unchanged."""
    prepare_for_criu(guest_a)
    check = client(guest_a, "check", "/root/criu-check")
    log.info("CRIU %s in the guest; check took %.2f s", check["version"], check["seconds"])
    assert check["version"].startswith(config.RELEASE.criu)

    state, images = "/root/workload", "/root/images"
    pid, digest = start_workload(guest_a, state)

    dump = client(guest_a, "dump", str(pid), images)
    record("criu dump of a 64 MiB process (RPC call, guest)", dump["seconds"])
    log.info("images: %.1f MiB", dump["bytes"] / (1 << 20))
    assert dump["handled"] == ["post-dump"]
    assert "post-dump" in dump["scripts"]
    assert dump["bytes"] >= 64 << 20
    gone = guest_a.channel.run(["test", "-e", f"/proc/{pid}"])
    assert gone.returncode != 0, f"PID {pid} still exists after a dump without leave_running"

    restore = client(guest_a, "restore", images, rst_sibling=True)
    record("criu restore of a 64 MiB process (RPC call, guest)", restore["seconds"])
    assert restore["pid"] == pid
    assert "post-restore" in restore["scripts"] and "post-resume" in restore["scripts"]

    guest_a.run("kill", "-USR1", str(pid))
    pid_after, digest_after = wait_report(guest_a, state, 2)
    assert pid_after == pid
    assert digest_after == digest
    cmdline = guest_a.run("cat", f"/proc/{pid}/cmdline").split("\0")
    assert cmdline[:2] == ["python3", "-c"], shlex.join(cmdline)
    guest_a.run("kill", str(pid))


def test_criu_pre_dump_chain_keeps_the_process_running_and_failures_show_criu_log(
    guest_a: qemu.Guest,
) -> None:
    """A pre-dump (track_mem) then a dump with parent_img and leave_running: the
    process keeps running with its memory, and the second dump stores only what
    changed.  A dump of a PID that does not exist fails with CRIU's errno and the
    error lines of the dump.log next to the images."""
    state = "/root/workload"
    pid, digest = start_workload(guest_a, state)

    pre = client(guest_a, "pre-dump", str(pid), "/root/chain/1", track_mem=True)
    record("criu pre-dump of a 64 MiB process (RPC call, guest)", pre["seconds"])
    assert pre["bytes"] >= 64 << 20
    dump = client(guest_a, "dump", str(pid), "/root/chain/2", track_mem=True,
                  parent_img="../1", leave_running=True)
    record("criu dump after a pre-dump, leave running (RPC call, guest)", dump["seconds"])
    log.info("pre-dump images: %.1f MiB, dump on top: %.1f MiB",
             pre["bytes"] / (1 << 20), dump["bytes"] / (1 << 20))
    assert dump["handled"] == ["post-dump"]
    assert dump["bytes"] < 16 << 20, "the unchanged 64 MiB belong to the parent images"

    guest_a.run("kill", "-USR1", str(pid))
    assert wait_report(guest_a, state, 2) == (pid, digest)

    failed = guest_a.channel.run(
        ["python3", "-c", CLIENT, "dump", "999999", "/root/bad", "{}"])
    message = failed.stderr.decode(errors="replace")
    assert failed.returncode == 1, message
    assert message.startswith("criu dump failed: CRIU reported failure"), message
    assert "last lines of /root/bad/dump.log" in message, message
    assert "Error" in message, message
    log.info("CRIU's failure as the client reports it:\n%s", message)
    guest_a.run("kill", str(pid))
