#!/usr/bin/env bash
# The blackout benchmark (not a test): the default `seamless upgrade` (no flags) against
# systemctl kexec into the same kernel and initramfs and a firmware reboot, for 64, 256
# and 1024 MiB of state, with what the upgrade adds to the new kernel's bare boot to
# init and whether it meets its goals (see vm-tests/vmtest/bench.py). Prints a table;
# writes JSON (BENCH_JSON, default bench.json) and a plot beside it (the same name, .png).
source "$(dirname "$0")/bootstrap.sh"
bootstrap
phase "installing the benchmark's Python packages (matplotlib, for the plot)"
timed "bench packages" "$ROOT/.venv/bin/python" -m pip install -q -e "${ROOT}[test,bench]"
phase "benchmark"
cd "$ROOT"
exec .venv/bin/python vm-tests/vm bench --json "${BENCH_JSON:-bench.json}" "$@"
