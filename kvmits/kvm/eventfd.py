"""An eventfd(2), for KVM_IRQFD (os.eventfd does the syscall; this adds a lifetime)."""

from __future__ import annotations

import os
import resource

#: descriptors left for everything else a process has open when ensure_fd_limit makes room
FD_HEADROOM = 1024


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


def ensure_fd_limit(count: int) -> int:
    """Make RLIMIT_NOFILE leave room for `count` more descriptors (plus FD_HEADROOM), as QEMU
    raises its soft limit at start: KVM_MAX_IRQ_ROUTES is 4096 and every routed GSI holds an
    irqfd, past the usual soft limit of 1024 (and the kernel's default hard limit of 4096). The
    soft limit goes up to what is needed; the hard one too when the process may (root:
    CAP_SYS_RESOURCE, up to fs.nr_open). Returns the soft limit; OSError naming the limit when
    it cannot make the room."""
    need = count + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    roomy = hard == resource.RLIM_INFINITY or hard >= need
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard if roomy else need))
    except (ValueError, OSError):
        raise OSError(f"RLIMIT_NOFILE is {soft}/{hard} (soft/hard) and could not be raised to {need} "
                      f"for {count} irqfds: raise it (ulimit -n) or use fewer routes") from None
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
