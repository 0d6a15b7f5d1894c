"""ioctl(2) for every KVM ioctl but one: every failure becomes a KvmError naming the ioctl.

The exception is KVM_RUN, the hot path: Vcpu.run calls libc's ioctl itself, to skip this
function's argument handling on every exit, and raises the same KvmError (kvmits.kvm.vcpu)."""

from __future__ import annotations

from kvmits import uapi
from kvmits.errors import KvmError

ffi = uapi.ffi
_libc_ioctl = uapi.libc.ioctl
_ULONG0 = ffi.cast("unsigned long", 0)


def ioctl(fd: int, name: str, arg=None, detail: str = "") -> int:
    """Call the KVM ioctl `name` (a key of uapi.IOCTLS) on `fd`.

    `arg` is None (no argument), an int (passed by value, as KVM_CREATE_VCPU and
    KVM_CHECK_EXTENSION take it) or a cffi pointer. Returns the non-negative result.
    """
    if arg is None:
        carg = _ULONG0
    elif isinstance(arg, int):
        carg = ffi.cast("unsigned long", arg)
    else:
        carg = arg
    ret = _libc_ioctl(fd, getattr(uapi, name), carg)
    if ret < 0:
        raise KvmError(name, ffi.errno, detail)
    return ret


def address_of(cdata) -> int:
    """The address of a cffi object, as KVM wants it in a u64 field."""
    return int(ffi.cast("uintptr_t", cdata))
