#!/bin/sh
# dracut cmdline hook (sourced), as early as dracut allows: keep the PIDs of the
# checkpointed processes free for their restore (seamless.last_pid=N), and start
# loading the modules the restore needs (seamless.restore=GENERATION).
# shellcheck source=/dev/null
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
# shellcheck source=seamless-lib.sh
. /lib/seamless/seamless-lib.sh

if _seamless_last=$(getarg seamless.last_pid=) && [ -n "$_seamless_last" ]; then
    seamless_reserve_pids "$_seamless_last"
fi
# After the PIDs: the modprobe started here must not take one of them.
if _seamless_gen=$(getarg seamless.restore=) && [ -n "$_seamless_gen" ]; then
    seamless_preload_modules
fi
unset _seamless_last _seamless_gen
