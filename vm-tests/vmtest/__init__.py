"""The QEMU test bed for seamless: a Debian guest with two kernels, driven from the host.

seamless freezes processes, writes into reserved RAM and replaces the running
kernel, so it is only ever exercised inside a guest.  This package builds the
guest image (:mod:`vmtest.image`), boots it under QEMU (:mod:`vmtest.qemu`),
and talks to an agent inside it over a virtio-serial port
(:mod:`vmtest.channel`), a channel that survives the guest kexec-ing into
another kernel.
"""
