"""A service the operator leaves out of the upgrade gets its clean stop before the kexec,
as `systemctl kexec` would give it, and runs again in the new kernel."""

from __future__ import annotations

import json

import pytest

from vmtest import config
from vmtest.qemu import BootGuest
from vmtest.workloads import COUNTER, main_pid, prepare_for_criu, read_counter, start_counter

pytestmark = pytest.mark.vm

B = config.KERNELS["B"]

#: Started by hand, not enabled: only seamless starts it again in B.
LEFT_OUT_UNIT = """\
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/leftout.py /root/leftout
ExecStop=/bin/sh -c 'echo "stopped cleanly at $$(cat /root/leftout)" >> /var/lib/leftout.stops'
"""


def test_a_service_left_out_is_stopped_cleanly_before_the_kexec_and_runs_again_in_b(
    boot_guest: BootGuest,
) -> None:
    """`seamless upgrade --exclude unit:leftout.service`: leftout's ExecStop ran once,
    before the kexec (its line is on disk in B); in B it runs again, a new process,
    although it is not enabled; the carried counter is back with its PID."""
    g = boot_guest("A")
    prepare_for_criu(g)
    g.sh(f"cat > /usr/local/lib/leftout.py <<'EOF'\n{COUNTER}EOF\n"
         f"cat > /etc/systemd/system/leftout.service <<'EOF'\n{LEFT_OUT_UNIT}EOF\n"
         "systemctl daemon-reload && systemctl start leftout.service && "
         "for i in $(seq 100); do test -s /root/leftout && exit 0; sleep 0.1; done; exit 1")
    old = main_pid(g, "leftout")
    carried = start_counter(g, "count1", "/root/count1")
    plan = json.loads(g.run("seamless", "plan", "--exclude", "unit:leftout.service", "--json"))
    assert old not in {t["root"] for t in plan["trees"]}

    g.switch_kernel(["seamless", "upgrade", "--kernel", B.vmlinuz, "--yes",
                     "--exclude", "unit:leftout.service"])

    assert g.run("uname", "-r").strip() == B.release
    state = g.settled()
    assert state in ("running", "degraded"), state  # the restore is done
    status = json.loads(g.run("seamless", "status", "--json"))
    assert status["ok"], status
    assert status["started_again"] == ["leftout.service"]
    stops = g.run("cat", "/var/lib/leftout.stops").splitlines()
    assert len(stops) == 1 and stops[0].startswith("stopped cleanly at "), stops
    g.sh("for i in $(seq 300); do systemctl is-active -q leftout.service && exit 0; "
         "sleep 0.2; done; exit 1")
    assert main_pid(g, "leftout") != old
    assert main_pid(g, "count1") == carried
    before = read_counter(g, "/root/count1")
    g.sh("sleep 1")
    assert read_counter(g, "/root/count1") > before
