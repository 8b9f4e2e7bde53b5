"""The demo: services running on kernel A, `seamless upgrade --kernel B`, their state kept."""

from __future__ import annotations

import json
import time
from typing import Any

from vmtest import config, image, qemu
from vmtest.log import log, timings
from vmtest.workloads import (
    BIG_MEMORY,
    COUNTER,
    HTTP_STATE,
    http,
    memory_report,
    read_counter,
    start_service,
    wait_http,
)

PORT = 8080
#: Room for the 256 MiB workload's images.
REGION = "512M!1G"


def snapshot(guest: qemu.Guest, pids: dict[str, int]) -> dict[str, Any]:
    return {
        "kernel": guest.run("uname", "-r").strip(),
        "pids": {unit: int(guest.run("systemctl", "show", "-P", "MainPID", unit))
                 for unit in pids},
        "counter": read_counter(guest, "/root/count"),
        "http_state": http(guest, PORT),
        "memory_sha256": memory_report(guest, pids["big"]).split()[-1],
    }


def main(*, json_output: bool = False) -> int:
    start = time.monotonic()
    img = image.build()
    spec = qemu.GuestSpec(image=str(img.directory), kernel="A", region=REGION)
    b = config.KERNELS["B"]
    with qemu.booted(img, spec, config.CACHE_DIR / "run" / "demo") as guest:
        # No manual step: the package's seamless-arm.service made the store at boot.
        log.info("the store on the reserved region (%s), made at boot: %s", spec.memmap,
                 guest.run("seamless", "store", "status").strip().splitlines()[0])
        log.info("starting three services: a counter, an HTTP server with state, "
                 "a process holding 256 MiB")
        pids = {
            "counter": start_service(guest, "counter", "python3", "-c", COUNTER,
                                     "/root/count"),
            "web": start_service(guest, "web", "python3", "-c", HTTP_STATE, str(PORT)),
            "big": start_service(guest, "big", "python3", "-c", BIG_MEMORY, "/root/big.sum"),
        }
        guest.sh("for i in $(seq 300); do test -s /root/big.sum && test -s /root/count &&"
                 " exit 0; sleep 0.2; done; exit 1")
        wait_http(guest, PORT)
        for _ in range(5):
            http(guest, PORT, "POST")
        before = snapshot(guest, pids)
        log.info("upgrading: seamless upgrade --kernel %s", b.vmlinuz)
        _, reboot_to_agent = guest.switch_kernel(
            ["seamless", "upgrade", "--kernel", b.vmlinuz, "--yes"])
        # The agent answers early in the boot; the restore may still be going on.
        guest.settled()
        after = snapshot(guest, pids)
        status = json.loads(guest.run("seamless", "status", "--json"))
        status_text = guest.run("seamless", "status")
    kept = (
        after["kernel"] == b.release
        and after["pids"] == before["pids"]
        and after["http_state"] == before["http_state"]
        and after["memory_sha256"] == before["memory_sha256"]
        and after["counter"] >= before["counter"]
        and status["ok"]
    )
    result = {
        "before": before,
        "after": after,
        "state_kept": kept,
        "upgrade_phases": status.get("phases", {}),
        "reboot_call_to_agent_seconds": round(reboot_to_agent, 1),
        "phases": [{"phase": p, "seconds": round(s, 2)} for p, s in timings],
        "total_seconds": round(time.monotonic() - start, 1),
    }
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        print(f"kernel:       {before['kernel']}  ->  {after['kernel']}")
        for unit, pid in before["pids"].items():
            print(f"{unit + ' PID:':<13} {pid}  ->  {after['pids'][unit]}")
        print(f"counter:      {before['counter']}  ->  {after['counter']} (counts on)")
        print(f"HTTP state:   {before['http_state']}  ->  {after['http_state']}")
        print(f"256 MiB hash: {before['memory_sha256'][:16]}…  ->  "
              f"{after['memory_sha256'][:16]}…")
        print("state kept" if kept else "STATE LOST")
        print()
        print(status_text.rstrip())
        print()
        for phase, seconds in timings:
            print(f"  {phase:<60} {seconds:6.1f} s")
        print(f"  {'total':<60} {result['total_seconds']:6.1f} s")
    return 0 if kept else 1
