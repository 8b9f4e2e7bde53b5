#!/bin/sh
# seamless boot-time restore, shared by the dracut module and the initramfs-tools
# script.  The work is done by the real root's seamless (and its python3 and
# criu), run chrooted into the real root: nothing of them is copied into the
# initramfs.

# seamless_modules LIST: the names of the kernel modules the restore loads, the
# preserved region's (pmem) and what CRIU needs, from the one list Python reads too
# (seamless/resources/kernel-modules: a name per line, then what needs it). Both
# generators' hooks put the list, and every module on it, into the initramfs.
SEAMLESS_MODULE_LIST=${SEAMLESS_MODULE_LIST:-/lib/seamless/kernel-modules}
seamless_modules() {
    while read -r _name _; do
        case $_name in '' | '#'*) continue ;; esac
        printf '%s\n' "$_name"
    done <"$1"
}

seamless_log() {
    if [ -c /dev/kmsg ]; then
        echo "seamless: $*" >/dev/kmsg
    else
        echo "seamless: $*" >&2
    fi
}

# seamless_preload_modules: start loading those modules in the background, as soon as
# the boot knows it restores: they load while udev looks for the disks, not after the
# real root is mounted (0.7 s of the blackout under TCG). seamless_restore loads them
# again: modprobe skips a loaded module and waits for one still loading.
seamless_preload_modules() {
    # shellcheck disable=SC2046 # a list of module names
    modprobe -a $(seamless_modules "$SEAMLESS_MODULE_LIST") >/dev/null 2>&1 &
}

# seamless_reserve_pids LAST: every process started from now on gets a PID above
# LAST, so none takes the PID of a process about to be restored.
seamless_reserve_pids() {
    _last=$1
    case $_last in '' | *[!0-9]*) return 1 ;; esac
    read -r _max </proc/sys/kernel/pid_max
    if [ "$_last" -ge $((_max - 1000)) ]; then
        echo 4194304 >/proc/sys/kernel/pid_max
    fi
    read -r _now </proc/sys/kernel/ns_last_pid
    if [ "$_now" -lt "$_last" ]; then
        echo "$_last" >/proc/sys/kernel/ns_last_pid && seamless_log "PIDs up to $_last kept free"
    fi
}

# seamless_restore ROOT GENERATION
seamless_restore() {
    _root=$1
    _gen=$2
    if [ -d /run/systemd/system ]; then
        # systemd ends every initramfs process at switch-root: the restore happens in
        # the real root (seamless-restore.service), before its services start.
        seamless_log "generation $_gen is restored by seamless-restore.service after switch-root"
        return 0
    fi
    # The upgrade found trees that only the real root's systemd can have back (a
    # sandboxed service's mount namespace, files on /srv of its own): all of them wait
    # for seamless-restore.service, which the note below tells why, and no restorer
    # starts here only to find that out.
    read -r _cmdline </proc/cmdline
    case " $_cmdline " in *" seamless.after_init "*)
        mkdir -p /run/seamless && echo "after switch-root, as the upgrade planned" >/run/seamless/deferred
        seamless_log "generation $_gen is restored by seamless-restore.service after switch-root, as the upgrade planned"
        return 0
        ;;
    esac
    if [ ! -x "$_root/usr/bin/seamless" ] && [ ! -x "$_root/usr/local/bin/seamless" ]; then
        seamless_log "no seamless on the real root at $_root: nothing restored"
        return 1
    fi
    # shellcheck disable=SC2046 # a list of module names
    modprobe -a $(seamless_modules "$SEAMLESS_MODULE_LIST") 2>/dev/null
    ip link set lo up 2>/dev/null
    # util-linux's mount where the initramfs carries it (initramfs-tools: klibc's);
    # dracut's mount is util-linux already.
    _mount=mount
    if [ -x /lib/seamless/bin/mount ]; then
        _mount=/lib/seamless/bin/mount
    fi
    # The restored processes open their files as they had them (for writing too): a real
    # root mounted read-only (the usual "ro" of the command line) becomes writable now,
    # as the boot would make it later anyway.
    _ro=""
    while read -r _ _mnt _ _opts _; do
        [ "$_mnt" = "$_root" ] || continue
        case ",$_opts," in *,ro,*) _ro=1 ;; *) _ro="" ;; esac
    done </proc/mounts
    if [ -n "$_ro" ]; then
        $_mount -o remount,rw "$_root" && seamless_log "remounted $_root read-write"
    fi
    # seamless.debug on the command line: every step, and the time of every import
    # (python's -X importtime) on the console. Read now: /proc moves away below.
    _debug=""
    case " $_cmdline " in *" seamless.debug "*) _debug=1 ;; esac
    seamless_log "restoring generation $_gen"
    # The initramfs's /dev, /proc, /sys and /run are moved into the real root for the
    # restore and back after it, not bound: a move keeps the mount itself, which the
    # boot then moves into the real root for good, so the files the restored processes
    # hold there stay on mounts of the running system (a later checkpoint finds them).
    # /proc goes last and comes back first: mount reads /proc/self/mountinfo. -n: no
    # userspace mount table (/run/utab) to write, and no exit code 16 for it.
    _moved=""
    for _d in dev sys run proc; do
        if [ -d "$_root/$_d" ] && $_mount -n --move "/$_d" "$_root/$_d"; then
            _moved="$_moved $_d"
        fi
    done
    # shellcheck disable=SC2016 # $1 and $2 expand in the chrooted shell
    # A lazy restore's finisher (left running, chrooted) waits for $SEAMLESS_HANDED_OVER:
    # it appears once /run is back in the real root for good (see below).
    chroot "$_root" /bin/sh -c '
        PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
        export SEAMLESS_HANDED_OVER=/run/seamless/boot-handed-over
        if [ -n "$2" ]; then
            PYTHONPROFILEIMPORTTIME=1 exec seamless --debug restore --boot --generation "$1"
        fi
        exec seamless restore --boot --generation "$1"' seamless "$_gen" "$_debug"
    _rc=$?
    for _d in proc dev sys run; do
        case " $_moved " in
        *" $_d "*) $_mount -n --move "$_root/$_d" "/$_d" ;;
        esac
    done
    # Written into the initramfs's /run: the chrooted finisher sees it only once the boot
    # has moved /run into the real root (before init), not while /run is still there
    # from the restore's move.
    case " $_moved " in
    *" run "*) mkdir -p /run/seamless && : >/run/seamless/boot-handed-over ;;
    esac
    seamless_log "restore finished with exit code $_rc"
    return $_rc
}
