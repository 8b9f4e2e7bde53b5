#!/usr/bin/env bash
# The blackout benchmark (not a test): seamless upgrade against systemctl kexec and a
# firmware reboot, for 64, 256 and 1024 MiB of state. Prints a table; writes JSON.
source "$(dirname "$0")/bootstrap.sh"
bootstrap
phase "benchmark"
cd "$ROOT"
exec .venv/bin/python vm-tests/vm bench --json "${BENCH_JSON:-bench.json}" "$@"
