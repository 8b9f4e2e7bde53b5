#!/usr/bin/env bash
# The whole test suite: lint, types, host tests and VM tests (QEMU).
source "$(dirname "$0")/bootstrap.sh"
bootstrap
cd "$ROOT"
phase "ruff"
timed "ruff" ruff check .
phase "shellcheck"
timed "shellcheck" shellcheck -x -P SCRIPTDIR dev/*.sh .ci/run \
    dracut-module/90seamless/*.sh initramfs/hooks/* initramfs/scripts/*/*
phase "mypy --strict"
timed "mypy" mypy
phase "pytest (host tests and VM tests)"
timed "pytest" python -m pytest "$@"
