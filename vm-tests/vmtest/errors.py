"""Errors of the test bed."""

from __future__ import annotations


class VMError(Exception):
    """Something about the test bed failed (building, booting, talking to the guest)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\nhint: {self.hint}" if self.hint else text


class LostVMError(VMError):
    """The guest stopped answering: QEMU exited, the kernel panicked, or a timeout ran out.

    Carries the last lines of the guest's serial console.
    """

    def __init__(self, reason: str, console_tail: str) -> None:
        super().__init__(f"{reason}\n--- last console lines ---\n{console_tail}")
        self.reason = reason
        self.console_tail = console_tail
