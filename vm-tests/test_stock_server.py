"""A stock Debian server: the distribution's own services, as apt installs and enables
them, sandboxing and all, carried across `seamless upgrade`."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.probe import exchange, free_port, measure_blackouts
from vmtest.qemu import BootGuest

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
REGION = "512M!1G"

#: Every packaged service of the stock image, each carried with its main PID (PG: the
#: cluster unit of the release's PostgreSQL, postgresql@15-main in 12, @17-main in 13).
UNITS = ("postgresql@PG-main.service", "mariadb.service", "redis-server.service",
         "memcached.service", "nginx.service", "apache2.service", "ssh.service",
         "cron.service", "earlyoom.service")

#: What CRIU refuses by design in Debian's units, and what `seamless plan` tells the
#: operator to apply once (each named in its finding): a SysV segment in the host's IPC
#: namespace (PostgreSQL), a private user namespace beside the host's namespaces
#: (redis), io_uring and an 8 TiB address space reservation (MariaDB); in Debian 13,
#: earlyoom's private tmpfs (DynamicUser= implies PrivateTmp=disconnected in systemd
#: 257) and its network namespace holding a journal stream of the host's.
REMEDIES = """
mkdir -p /etc/systemd/system/postgresql@PG-main.service.d /etc/systemd/system/redis-server.service.d
printf '[Service]\\nPrivateIPC=yes\\n' > /etc/systemd/system/postgresql@PG-main.service.d/ipc.conf
printf '[Service]\\nPrivateUsers=no\\n' > /etc/systemd/system/redis-server.service.d/users.conf
printf '[mariadbd]\\ninnodb_use_native_aio=0\\ninnodb_buffer_pool_size_max=128M\\n' \\
    > /etc/mysql/mariadb.conf.d/90-seamless.cnf
mkdir -p /etc/systemd/system/earlyoom.service.d
printf '[Service]\\nPrivateTmp=yes\\nPrivateNetwork=no\\n' \\
    > /etc/systemd/system/earlyoom.service.d/sandbox.conf
systemctl daemon-reload
systemctl restart postgresql@PG-main redis-server mariadb earlyoom
"""

#: Each service as a client on the host sees it, through a port forwarded into the guest:
#: the port it listens on, what the client sends and what the service answers (a regular
#: expression). PostgreSQL answers an SSLRequest with N or S; MariaDB speaks first, a
#: greeting (protocol 10) or an error packet; redis in protected mode answers DENIED;
#: sshd its greeting, or the refusal of OpenSSH 10's PerSourcePenalties: the probes'
#: connections that never log in soon get the host's address penalized, and its listener
#: then refuses it (without a fork) for a while.
PROBES = {
    "ssh": (22, b"", rb"SSH-2\.0-|Not allowed at this time"),
    "apache2": (80, b"GET / HTTP/1.0\r\n\r\n", rb"HTTP/1\.1 200"),
    "nginx": (8080, b"GET / HTTP/1.0\r\n\r\n", rb"HTTP/1\.1 200"),
    "postgresql": (5432, struct.pack("!II", 8, 80877103), rb"[NS]"),
    "redis": (6379, b"PING\r\n", rb"\+PONG|-DENIED"),
    "memcached": (11211, b"version\r\n", rb"VERSION "),
    "mariadb": (3306, b"", rb"....[\x0a\xff]"),
}

#: Debian's databases and caches listen on loopback only: they listen on the guest's
#: address too, as on a server that serves its network, for the host's probes.
LISTEN = """
sed -i 's/^-l 127.0.0.1$/-l 0.0.0.0/' /etc/memcached.conf
sed -i 's/^bind 127.0.0.1 -::1$/bind 0.0.0.0 -::1/' /etc/redis/redis.conf
echo "listen_addresses = '*'" > /etc/postgresql/PG/main/conf.d/listen.conf
printf '[mariadbd]\\nbind-address=0.0.0.0\\nskip-name-resolve\\n' \\
    > /etc/mysql/mariadb.conf.d/91-listen.cnf
systemctl restart memcached
"""

MEMCACHED = "timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/11211; cat >&3; cat <&3'"

LOAD_STATE = """
redis-cli set rkey rvalue
printf 'set k1 0 0 5\\r\\nhello\\r\\nquit\\r\\n' | """ + MEMCACHED + """
mariadb -e "create database s; create table s.m (k int primary key, v varchar(20))
            engine=memory; insert into s.m values (1, 'in-memory')"
su postgres -c "psql -qc 'create table t (v text); insert into t values (\\$\\$row\\$\\$)'"
"""


#: Two clients, each a tree of its own holding a session to a service's tree: psql over
#: PostgreSQL's unix socket with a TEMP table (gone if the session were lost), fed
#: commands through a named pipe (kept open by a sleep of its tree); and an HTTP client
#: keeping one keep-alive connection to nginx over loopback, a request a second, writing
#: its local port and each answer.
CLIENTS = """
systemd-run --unit=pgclient -p User=postgres -p WorkingDirectory=/var/lib/postgresql sh -c \
    'mkfifo -m 600 commands; sleep infinity > commands & exec psql -q < commands'
for i in $(seq 100); do test -p /var/lib/postgresql/commands && break; sleep 0.1; done
systemd-run --unit=httpclient python3 -c '
import http.client, time
c = http.client.HTTPConnection("127.0.0.1", 8080)
c.connect()
port, n = c.sock.getsockname()[1], 0
while True:
    c.request("GET", "/")
    r = c.getresponse(); r.read()
    n += 1
    with open("/root/http.new", "w") as f:
        f.write(f"{port} {n} {r.status}\\n")
    __import__("os").replace("/root/http.new", "/root/http")
    time.sleep(1)
'
"""

#: A sandboxed daemon as chronyd and php-fpm are: its stdout at /dev/null and its log
#: through syslog() (a datagram socket connected to journald's /dev/log, with no journal
#: stream beside it), and a memfd (php-fpm's opcache lock is one), in a mount namespace
#: of its own. It logs a tick every two seconds.
SYSLOGGER = """
systemd-run --unit=syslogger -p PrivateTmp=yes -p StandardOutput=null -p StandardError=null \
    python3 -c '
import os, syslog, time
fd = os.memfd_create("lock")
os.write(fd, b"kept")
syslog.openlog("syslogger")
n = 0
while True:
    n += 1
    syslog.syslog(f"tick {n}")
    time.sleep(2)
'
"""

#: The syslogger's memfd, read through its descriptor.
MEMFD = ("p=$(systemctl show -P MainPID syslogger); for f in /proc/$p/fd/*; do"
         " case $(readlink $f) in /memfd:lock*) cat $f;; esac; done")

PG_SESSION = "create temp table session (v text); insert into session values ('kept');"


def psql_in_session(g: qemu.Guest, sql: str, out: str) -> str:
    """Run ``sql`` in pgclient's session; it writes its answer to ``out`` (COPY)."""
    g.sh(f"echo \"copy ({sql}) to '{out}';\" >> /var/lib/postgresql/commands")
    return g.sh(f"for i in $(seq 150); do test -s {out} && cat {out} && exit 0; sleep 0.2;"
                " done; exit 1")


def http_client(g: qemu.Guest) -> tuple[int, int]:
    """The client's local port and how many answers (each a 200) it had."""
    port, count, code = g.run("cat", "/root/http").split()
    assert code == "200"
    return int(port), int(count)


def with_pg(g: qemu.Guest, text: str) -> str:
    """``text`` with PG replaced by the guest's PostgreSQL major version."""
    return text.replace("PG", g.run("ls", "/etc/postgresql").split()[0])


def main_pids(g: qemu.Guest) -> dict[str, int]:
    return {u: int(g.run("systemctl", "show", "-P", "MainPID", u)) for u in units(g)}


def units(g: qemu.Guest) -> tuple[str, ...]:
    return tuple(with_pg(g, u) for u in UNITS)


def assert_state(g: qemu.Guest) -> None:
    assert g.run("redis-cli", "get", "rkey").strip() == "rvalue"
    assert "hello" in g.sh("printf 'get k1\\r\\nquit\\r\\n' | " + MEMCACHED)
    assert g.run("mariadb", "-N", "-e", "select v from s.m").strip() == "in-memory"
    assert g.sh("su postgres -c \"psql -Atc 'select v from t'\"").strip() == "row"


def all_up(g: qemu.Guest) -> None:
    """The new boot settles with every unit up: no job left and none failed."""
    state = g.settled()
    if state != "running":
        print(g.sh(
        "systemctl --failed --no-pager; systemctl list-jobs --no-pager; for u in $(systemctl "
        "--failed --no-legend --plain | cut -d' ' -f1); do journalctl -b -o short-monotonic "
        "--no-pager -n 60 -u $u; done; journalctl -b -o short-monotonic --no-pager -n 60 "
        "-u seamless-restore", check=False))
    assert state == "running", g.run("systemctl", "--failed", "--no-pager")


@pytest.mark.long(880)
def test_a_stock_debian_server_keeps_its_packaged_services(boot_stock: BootGuest) -> None:
    """postgresql, mariadb, redis, memcached, nginx, apache2, sshd, cron and earlyoom
    (DynamicUser=yes) as Debian packages them, libc replaced on disk since they started
    (as a package upgrade leaves them), with a psql session over PostgreSQL's
    unix socket and an HTTP keep-alive connection to nginx over loopback: `seamless
    plan` names what CRIU refuses by design with the remedy; once applied, plan and a
    checkpoint agree, and after `seamless upgrade` to B (booting initramfs-tools'
    initramfs, as Debian does) every unit has the same main PID
    and its in-memory state (redis's key, memcached's item, a MariaDB MEMORY table), the
    psql session its TEMP table and the HTTP client its connection, a sandboxed daemon
    logging through syslog() its memfd and its log; a client on the
    host probing each service sees it answer again (its blackout recorded). Afterwards each unit
    is its own again: `systemctl restart` starts it afresh and it serves; and the units
    so restarted go back to A with their PIDs, and on to B again."""
    g = boot_stock("A", region=REGION, forwards={port: free_port() for port, _, _ in
                                                 PROBES.values()})
    g.settled()
    refused = g.channel.run(["seamless", "plan", "--json"])
    assert refused.returncode != 0
    findings = json.loads(refused.out)["findings"]
    blocking = {f["resource"].split(" ")[0] for f in findings if f["blocking"]}
    assert {"SysV", "user", "io_uring", "a"} <= blocking, findings
    hints = " ".join(f["hint"] for f in findings if f["blocking"])
    remedies = ["PrivateIPC=yes", "PrivateUsers=no", "innodb_use_native_aio=0",
                "innodb_buffer_pool_size_max"]
    earlyoom = g.run("systemctl", "show", "-P", "PrivateTmpEx", "-P", "PrivateNetwork",
                     "earlyoom").split()
    if "disconnected" in earlyoom:  # systemd 257's DynamicUser=
        remedies.append("PrivateTmp=yes")
    if "yes" in earlyoom:  # Debian 13's unit
        remedies.append("PrivateNetwork=no")
    for remedy in remedies:
        assert remedy in hints, hints

    g.sh(with_pg(g, LISTEN + REMEDIES), timeout=300)
    g.sh(LOAD_STATE, timeout=120)
    # A package upgrade before the kernel's: libc replaced on disk, as dpkg does it (a
    # new file renamed over the old): every running process maps a deleted libc.
    g.sh("lib=$(readlink -f /usr/lib/x86_64-linux-gnu/libc.so.6);"
         " cp -p $lib $lib.dpkg-new && mv $lib.dpkg-new $lib")
    g.sh(CLIENTS + SYSLOGGER)
    g.sh(f"echo \"{PG_SESSION}\" >> /var/lib/postgresql/commands")
    assert psql_in_session(g, "select v from session", "/var/lib/postgresql/s1") == "kept\n"
    g.sh("for i in $(seq 100); do test -s /root/http && exit 0; sleep 0.2; done; exit 1")
    plan = json.loads(g.run("seamless", "plan", "--json"))
    assert plan["ok"], plan["findings"]
    replaced = [f for f in plan["findings"] if "files replaced" in f["resource"]]
    # the services started before libc was replaced; the clients after
    services = {t["root"] for t in plan["trees"] if t["unit"] in units(g)}
    clients = {t["root"] for t in plan["trees"] if t["unit"] not in units(g)}
    assert services <= {f["pid"] for f in replaced}, replaced
    assert not clients & {f["pid"] for f in replaced}, replaced
    assert any("libc.so.6" in f["resource"] for f in replaced), replaced
    planned = {t["unit"] for t in plan["trees"]}
    assert set(units(g)) | {"pgclient.service", "httpclient.service",
                            "syslogger.service"} <= planned, planned
    # The plan never lies: what it calls ready, a checkpoint carries.
    checked = g.channel.run(["seamless", "checkpoint", "--leave-running", "--no-pre-dump"],
                            timeout=600)
    assert checked.returncode == 0, checked.stderr.decode(errors="replace")
    g.run("seamless", "store", "wipe", "--yes")
    before = main_pids(g)
    assert_state(g)
    port, answered = http_client(g)
    syslogger = g.run("systemctl", "show", "-P", "MainPID", "syslogger").strip()
    assert g.sh(MEMFD) == "kept"

    # Each service probed from the host twice a second across the upgrade: each answers
    # again, and its blackout as a client sees it is recorded.
    asks = {name: exchange(g.spec.forwards[port], request, reply, timeout=2)
            for name, (port, request, reply) in PROBES.items()}
    switched: list[float] = []
    blackouts = measure_blackouts(asks, lambda: switched.append(g.switch_kernel(
        ["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes", "--no-pre-dump"])[1]),
        interval=0.5)
    seconds = switched[0]
    assert g.run("uname", "-r").strip() == B.release, g.channel.run(["seamless", "status"]).out
    for name, blackout in blackouts.items():
        record(f"stock server upgrade: blackout of {name} seen from the host, from "
               f"{blackout.began:.1f} s after the command", blackout.seconds)
    all_up(g)
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"], status
    # The image boots initramfs-tools' initramfs, as Debian does: the sandboxed units'
    # namespaces need the real root, so every tree came back after switch-root.
    assert status["stage"] == "systemd" and "mount namespace" in status["deferred"], status
    # The services listen on every address: the restore put the DHCP lease back, and
    # networkd, told to keep it (not remove it until its own DHCP has it again), did;
    # only eth0's .network file was told (not systemd's examples for containers).
    keeps = status.get("networkd_keeps") or []
    assert len(keeps) == 1 and keeps[0].endswith("/50-seamless-keep-leases.conf"), status
    keep = keeps[0]
    eth0 = g.run("networkctl", "status", "eth0")
    assert "50-seamless-keep-leases.conf" in eth0, eth0
    network_file = re.search(r"Network File: (\S+)", eth0)
    assert network_file and keep.startswith(
        f"/run/systemd/network/{os.path.basename(network_file[1])}.d/"), (keep, eth0)
    for name, value in status["phases"].items():
        record(f"stock server upgrade phase: {name}", value)
    assert main_pids(g) == before
    assert_state(g)
    # The clients' sessions: the same TEMP table over the unix socket, the same
    # keep-alive connection (same local port) answering again.
    assert psql_in_session(g, "select v from session", "/var/lib/postgresql/s2") == "kept\n"
    g.sh(f"for i in $(seq 100); do set -- $(cat /root/http); test $2 -gt {answered + 2}"
         " && exit 0; sleep 0.2; done; exit 1")
    assert http_client(g)[0] == port
    # The syslogger: the same process, its memfd, and its syslog socket connected again
    # to the new boot's journal, which has its ticks.
    assert g.run("systemctl", "show", "-P", "MainPID", "syslogger").strip() == syslogger
    assert g.sh(MEMFD) == "kept"
    g.sh("for i in $(seq 60); do journalctl -b -t syslogger | grep -q tick && exit 0;"
         " sleep 0.5; done; exit 1")
    # The adoption drop-ins served their one start and are gone (seamless-adopted.service
    # removes them and reloads once the boot has finished).
    assert g.sh("for i in $(seq 120); do n=$(ls /run/systemd/system/*.d/50-seamless-adopt"
                ".conf 2>/dev/null | wc -l); [ $n = 0 ] && break; sleep 0.5; done; echo $n"
                ).strip() == "0", g.run("systemctl", "status", "seamless-adopted", check=False)
    # reload uses the unit's own ExecReload= and the PID file carried across
    g.run("systemctl", "reload", "nginx.service")
    assert int(g.run("systemctl", "show", "-P", "MainPID", "nginx.service")) == before[
        "nginx.service"]
    # No leftover of CRIU's in the host's mounts, to be copied into every namespace made
    # from now on (and to fail the next upgrade's restore of it), nor in a service's.
    assert ".criu.mntns." not in g.run("cat", "/proc/self/mountinfo")
    assert g.sh("for u in " + " ".join(units(g)) + "; do grep -l .criu.mntns."
                " /proc/$(systemctl show -P MainPID $u)/mountinfo || true; done") == ""
    # PostgreSQL restarts with the carried session still connected: the backend's socket
    # is non-blocking again, as it was (a blocking one in its place kept the backend in
    # a read that its shutdown signal never ended: pg_ctl waited out its 60 s and failed).
    pg = units(g)[0]
    restarted = g.channel.run(["timeout", "50", "systemctl", "restart", pg], timeout=120)
    assert restarted.returncode == 0, g.sh(f"journalctl -b --no-pager -n 30 -u {pg}", check=False)
    g.run("systemctl", "stop", "pgclient", "httpclient")
    # the others at once, as one restart of several units: their jobs run side by side
    restarted = g.channel.run(["timeout", "240", "systemctl", "restart", *units(g)[1:]],
                              timeout=360)
    assert restarted.returncode == 0, g.sh(
        "systemctl list-jobs --no-pager; systemctl --failed --no-pager;"
        " journalctl -b --no-pager -n 40", check=False)
    for unit in units(g):
        assert g.run("systemctl", "is-active", unit).strip() == "active", unit
        assert int(g.run("systemctl", "show", "-P", "MainPID", unit)) not in (0, before[unit])
    assert g.run("redis-cli", "ping").strip() == "PONG"
    for port in (80, 8080):
        assert g.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://127.0.0.1:{port}/").strip() == "200"
    g.sh("su postgres -c \"psql -Atc 'select 1'\"")
    g.run("mariadb", "-e", "select 1")
    record("stock server upgrade: reboot call to agent ready in B", seconds)

    # And back to A, with dracut's initramfs this time: the units as restarted in B,
    # sandboxes and all, keep their PIDs, and their private /tmp what was in it.
    g.run("redis-cli", "set", "rkey", "from-B")
    g.sh("touch /proc/$(systemctl show -P MainPID apache2)/root/tmp/kept")
    again = main_pids(g)
    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", A.vmlinuz,
                                  "--initrd", A.dracut_initrd, "--yes", "--no-pre-dump"])
    assert g.run("uname", "-r").strip() == A.release
    all_up(g)
    assert main_pids(g) == again, g.channel.run(["seamless", "status"]).out
    assert g.run("redis-cli", "get", "rkey").strip() == "from-B"
    g.sh("ls /proc/$(systemctl show -P MainPID apache2)/root/tmp/kept")
    assert "deferred" not in json.loads(g.run("seamless", "status", "--json"))
    record("stock server upgrade: reboot call to agent ready in A", seconds)

    # And to B once more, nothing restarted: each service carried a second time, with
    # the private /tmp and /var/tmp of the boot it started in (its unit made others of
    # this boot when it adopted it).
    _, seconds = g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                                  "--no-pre-dump"])
    assert g.run("uname", "-r").strip() == B.release
    all_up(g)
    assert main_pids(g) == again, g.channel.run(["seamless", "status"]).out
    assert g.run("redis-cli", "get", "rkey").strip() == "from-B"
    g.sh("ls /proc/$(systemctl show -P MainPID apache2)/root/tmp/kept")
    record("stock server upgrade: reboot call to agent ready in B, carried twice", seconds)
