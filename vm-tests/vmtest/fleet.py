"""A fleet of guests driven by Ansible, as an operator's: the collection (ansible/)
installed on the host, each guest reached over ssh through a forwarded port. Used by
the Ansible VM test and by ``vm fleet-bench``, which sets a seamless rollout beside a
rollout with Ansible's own reboot module (state lost)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmtest import config, image, qemu
from vmtest.errors import VMError
from vmtest.log import log
from vmtest.probe import free_port
from vmtest.ssh import authorize_key
from vmtest.workloads import PORT, http, main_pid, start_web_unit

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"

#: The rollout operators run today: Ansible's reboot module, host by host, the same
#: health check (the service's port answers) before the next host; the state is lost.
REBOOT_PLAY = f"""\
- name: Reboot into the new kernel, host by host
  hosts: all
  serial: 1
  max_fail_percentage: 0
  gather_facts: false
  tasks:
    - name: Reboot
      ansible.builtin.reboot:
        reboot_timeout: 1800
    - name: Health check, the service's port
      ansible.builtin.wait_for:
        port: {PORT}
        timeout: 300
"""


@dataclass
class Host:
    name: str
    guest: qemu.Guest
    web: int  #: the PID of the HTTP service holding state
    line: str  #: its inventory line


def install_collection(directory: Path) -> Path:
    """``ansible-galaxy collection install`` of ansible/ into ``directory``."""
    if shutil.which("ansible-playbook") is None:
        raise VMError("ansible-playbook is missing",
                      hint="./dev/bootstrap.sh installs ansible-core from Debian's archive")
    subprocess.run(["ansible-galaxy", "collection", "install", "-p", str(directory),
                    str(ANSIBLE)], check=True, capture_output=True)
    return directory


def prepare(name: str, g: qemu.Guest, port: int, key_dir: Path) -> Host:
    """sshd enabled as on a server, root's key authorized, an HTTP service with state
    (its counter at 2)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    key = authorize_key(g, key_dir)
    # enabled, as on a server: the upgrade runs over one of sshd's sessions, so sshd's
    # tree holds the coordinator and is not carried; B starts sshd afresh
    g.run("systemctl", "enable", "--now", "ssh.service")
    web = start_web_unit(g)
    for _ in range(2):
        http(g, PORT, "POST")
    return Host(name, g, web,
                f"{name} ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
                f"ansible_ssh_private_key_file={key} "
                "ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null'")


def inventory(hosts: list[Host], path: Path) -> Path:
    path.write_text("".join(h.line + "\n" for h in hosts))
    return path


def playbook(collections: Path, inventory_path: Path, play: str,
             *extra: str) -> tuple[int, str, float]:
    """Run one playbook (a collection's name or a file); its exit status, output and
    wall time."""
    start = time.monotonic()
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory_path), play, *extra],
        env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections),
             "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False",
             "ANSIBLE_STDOUT_CALLBACK": "default"},
        capture_output=True, text=True, timeout=1800)
    out = result.stdout + result.stderr
    print(out)
    return result.returncode, out, time.monotonic() - start


def back_in_new_boot(g: qemu.Guest) -> None:
    """The playbook, not the test bed, moved the guest to a new boot: find its agent there."""
    before = g.info
    assert before is not None
    g.wait_ready(qemu.BOOT_TIMEOUT, not_boot=before.boot_id)


def bench() -> int:
    """Two guests, a seamless rollout to B, then a reboot rollout (QEMU resets the
    machine and boots A again); prints both plays' wall time and what each kept."""
    img = image.build()
    b = config.KERNELS["B"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="seamless-fleet-") as tmp:
        work = Path(tmp)
        collections = install_collection(work / "collections")
        hosts: list[Host] = []
        guests = []
        try:
            for name in ("h1", "h2"):
                port = free_port()
                spec = qemu.GuestSpec(image=str(img.directory), kernel="A",
                                      forwards={22: port})
                g = qemu.boot(img, spec, config.CACHE_DIR / "run" / f"fleet-{name}")
                guests.append(g)
                hosts.append(prepare(name, g, port, work / name))
            hosts_file = inventory(hosts, work / "hosts")
            rc, out, seconds = playbook(
                collections, hosts_file, "seamless.kernel.rolling_upgrade",
                "-e", f"seamless_kernel={b.release}",
                "-e", f'{{"seamless_health_ports": [{PORT}]}}')
            if rc != 0:
                raise VMError(f"the seamless rollout failed:\n{out}")
            for h in hosts:
                back_in_new_boot(h.guest)
            rows.append(("seamless rolling_upgrade", seconds, kept(hosts)))
            play = work / "reboot.yml"
            play.write_text(REBOOT_PLAY)
            for h in hosts:
                h.guest.qmp("set-action", reboot="reset")
            rc, out, seconds = playbook(collections, hosts_file, str(play))
            if rc != 0:
                raise VMError(f"the reboot rollout failed:\n{out}")
            for h in hosts:
                back_in_new_boot(h.guest)
            rows.append(("ansible.builtin.reboot", seconds, kept(hosts)))
        finally:
            for g in guests:
                g.stop()
    print(f"\n{'rollout of 2 hosts':<28}{'wall s':>8}  state of the HTTP service")
    for what, seconds, state in rows:
        print(f"{what:<28}{seconds:8.1f}  {state}")
    log.info("fleet bench done")
    return 0


def kept(hosts: list[Host]) -> str:
    """Each host's service: the same PID and counter, or what it is now."""
    out = []
    for h in hosts:
        pid, count = main_pid(h.guest, "web.service"), http(h.guest, PORT)
        out.append(f"{h.name}: " + ("kept (same PID, counter 2)" if (pid, count) == (h.web, 2)
                                    else f"lost (PID {h.web} -> {pid}, counter {count})"))
    return "; ".join(out)
