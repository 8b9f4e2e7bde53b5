#!/bin/sh
# dracut pre-pivot hook (sourced): restore the checkpointed processes when asked.
# shellcheck source=/dev/null
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
# shellcheck source=seamless-lib.sh
. /lib/seamless/seamless-lib.sh

if _seamless_gen=$(getarg seamless.restore=) && [ -n "$_seamless_gen" ]; then
    seamless_restore "${NEWROOT:-/sysroot}" "$_seamless_gen" || warn "seamless: restore failed (the boot goes on; see seamless status)"
fi
unset _seamless_gen
