#!/bin/bash
# dracut module of seamless: restores checkpointed processes at boot, after the
# real root is mounted and before switch_root, when the kernel command line
# carries seamless.restore=GENERATION.  check() leaves it out unless asked for:
# the package's dracut.conf.d/90-seamless.conf asks for it in every initramfs dracut
# builds, and `seamless kexec` adds it (dracut --add seamless) to one it builds.

# called by dracut
check() {
    require_binaries chroot modprobe mount umount || return 1
    return 255
}

# called by dracut
depends() {
    echo base
    return 0
}

# called by dracut
# shellcheck disable=SC2154 # moddir is set by dracut
installkernel() {
    # The preserved region (legacy pmem), and what CRIU needs to restore sockets: the
    # list the restore loads them from (kernel-modules, read by seamless-lib.sh).
    # shellcheck source=seamless-lib.sh
    . "$moddir/seamless-lib.sh"
    # shellcheck disable=SC2046 # a list of module names
    hostonly='' instmods $(seamless_modules "$moddir/kernel-modules")
}

# called by dracut
# shellcheck disable=SC2154 # moddir is set by dracut
install() {
    inst_multiple chroot modprobe mount umount
    inst_multiple -o ip
    inst_simple "$moddir/seamless-lib.sh" /lib/seamless/seamless-lib.sh
    inst_simple "$moddir/kernel-modules" /lib/seamless/kernel-modules
    inst_hook cmdline 01 "$moddir/seamless-pids.sh"
    inst_hook pre-pivot 90 "$moddir/seamless-restore.sh"
}
