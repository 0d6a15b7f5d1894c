"""Exception types shared by every layer (the bottom of the import graph)."""

import errno as _errno
import os


class KvmitsError(Exception):
    """Base class of every error kvmits raises on purpose."""


class KvmError(KvmitsError, OSError):
    """A KVM ioctl (or a syscall around one) failed.

    Carries the ioctl's UAPI name and the errno, so a failure reads like
    ``KVM_SET_DEVICE_ATTR failed: EBUSY (Device or resource busy)``.
    """

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        self.ioctl = ioctl
        self.errno_name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {self.errno_name} ({os.strerror(err)})"
        if detail:
            msg += f" [{detail}]"
        OSError.__init__(self, err, msg)
        self.errno = err

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.ioctl, self.errno))


class GuestMemoryError(KvmitsError, ValueError):
    """An access to a guest-physical range that no guest memory region backs."""

    def __init__(self, gpa: int, size: int, what: str = "guest memory"):
        self.gpa = gpa
        self.size = size
        super().__init__(f"{what}: [{gpa:#x}, {gpa + size:#x}) is not backed by guest RAM")
