"""The demo: build the guest, boot kernel A, kexec into kernel B, keep the region's data."""

from __future__ import annotations

import json
import time

from vmtest import config, image, pmem, qemu
from vmtest.log import log, timings

DATA_MIB = 64


def main(*, json_output: bool = False) -> int:
    start = time.monotonic()
    img = image.build()
    spec = qemu.GuestSpec(image=str(img.directory), kernel="A")
    a, b = config.KERNELS["A"], config.KERNELS["B"]
    with qemu.booted(img, spec, config.CACHE_DIR / "run" / "demo") as guest:
        assert guest.info is not None
        before = guest.info
        log.info("guest runs %s; writing %d MiB of random data into the reserved region "
                 "(%s)", before.release, DATA_MIB, spec.memmap)
        written = pmem.fill_random(guest, DATA_MIB)
        after = guest.kexec(b)
        read = pmem.read_sha256(guest, DATA_MIB)
    result = {
        "from": before.release,
        "to": after.release,
        "kernel_b_expected": b.release,
        "kernel_a_expected": a.release,
        "region": spec.memmap,
        "data_mib": DATA_MIB,
        "sha256_written": written,
        "sha256_after_kexec": read,
        "data_intact": written == read,
        "boot_id_changed": before.boot_id != after.boot_id,
        "phases": [{"phase": p, "seconds": round(s, 2)} for p, s in timings],
        "total_seconds": round(time.monotonic() - start, 1),
    }
    ok = result["data_intact"] and after.release == b.release
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        print(f"kernel A: {before.release}  ->  kernel B: {after.release} (kexec_file_load)")
        print(f"reserved region {spec.memmap}: {DATA_MIB} MiB "
              f"{'kept byte-identical' if result['data_intact'] else 'CHANGED'} across the kexec")
        for phase, seconds in timings:
            print(f"  {phase:<55} {seconds:6.1f} s")
        print(f"  {'total':<55} {result['total_seconds']:6.1f} s")
    return 0 if ok else 1
