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
phase "Debian package (dpkg-buildpackage, lintian)"
timed "deb" "$ROOT/dev/deb.sh"
# The VM tests run on Debian 13 (or the release SEAMLESS_VM_RELEASE names); the core
# upgrade scenarios (marked debian12) run on Debian 12 too, so neither breaks silently.
phase "pytest (host tests and VM tests, Debian ${SEAMLESS_VM_RELEASE:-13})"
# Two tests at a time (SEAMLESS_TEST_JOBS): a guest spends much of its time waiting (for
# a boot, a unit, a retransmission), and the image builds are shared under a lock.
JOBS=(-n "${SEAMLESS_TEST_JOBS:-2}")
timed "pytest" python -m pytest "${JOBS[@]}" --durations=12 "$@"
if [ -z "${SEAMLESS_VM_RELEASE:-}" ]; then
    phase "pytest (the core upgrade scenarios on Debian 12)"
    status=0
    SEAMLESS_VM_RELEASE=12 timed "pytest (Debian 12)" python -m pytest "${JOBS[@]}" -m debian12 "$@" \
        || status=$?
    # 5: the arguments selected none of them.
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
fi
