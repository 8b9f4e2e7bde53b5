"""What the checkpoint reads and the restore reopens, kept apart from the checkpoint's
own modules so that the boot-time restorer does not import them."""

from __future__ import annotations

#: Unix sockets of journald that a service's stdout/stderr stream into.
JOURNALD_STDOUT = "/run/systemd/journal/stdout"
