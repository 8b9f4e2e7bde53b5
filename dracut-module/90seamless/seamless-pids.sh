#!/bin/sh
# dracut cmdline hook (sourced), as early as dracut allows: keep the PIDs of the
# checkpointed processes free for their restore (seamless.last_pid=N).
# shellcheck source=/dev/null
type getarg >/dev/null 2>&1 || . /lib/dracut-lib.sh
# shellcheck source=seamless-lib.sh
. /lib/seamless/seamless-lib.sh

if _seamless_last=$(getarg seamless.last_pid=) && [ -n "$_seamless_last" ]; then
    seamless_reserve_pids "$_seamless_last"
fi
unset _seamless_last
