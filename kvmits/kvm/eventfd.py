"""An eventfd(2), for KVM_IRQFD (os.eventfd does the syscall; this adds a lifetime)."""

from __future__ import annotations

import os


class EventFd:
    """A counter file descriptor: write() adds to it, read() takes it (EFD_NONBLOCK by default).

    KVM consumes writes to an irqfd eventfd itself and injects the GSI's interrupt.
    """

    def __init__(self, initial: int = 0, nonblocking: bool = True):
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd = os.eventfd(initial, flags)

    def fileno(self) -> int:
        return self.fd

    def write(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """The counter, reset to 0; 0 if nothing was written (non-blocking mode)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
