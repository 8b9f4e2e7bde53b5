"""Workloads the VM tests checkpoint, and what CRIU needs in the guest."""

from __future__ import annotations

from vmtest.qemu import Guest

#: What Debian's CRIU needs loaded (socket diagnostics, nftables for the network
#: lock, tun and veth for its checks).
CRIU_MODULES = ("inet_diag", "tcp_diag", "udp_diag", "raw_diag", "unix_diag", "netlink_diag",
                "af_packet_diag", "nf_tables", "tun", "veth")

#: Counts in memory; writes the count to FILE and says it on stdout (the journal).
COUNTER = (
    "import itertools, sys, time\n"
    "for i in itertools.count():\n"
    "    open(sys.argv[1], 'w').write(str(i)); print('count', i, flush=True); time.sleep(0.2)\n"
)


def prepare_for_criu(guest: Guest) -> None:
    guest.run("modprobe", "-a", *CRIU_MODULES)
    guest.run("ip", "link", "set", "lo", "up")


def start_counter(guest: Guest, unit: str, path: str) -> int:
    """Run a counter as the systemd service ``unit``; returns its PID once it counts."""
    guest.run("systemd-run", f"--unit={unit}", "python3", "-c", COUNTER, path)
    guest.sh(f"for i in $(seq 100); do test -s {path} && exit 0; sleep 0.1; done; exit 1")
    return int(guest.run("systemctl", "show", "-P", "MainPID", unit))


def read_counter(guest: Guest, path: str) -> int:
    return int(guest.run("cat", path))
