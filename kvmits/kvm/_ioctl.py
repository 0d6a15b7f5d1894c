"""ioctl(2) for every KVM ioctl but one: every failure becomes a KvmError naming the ioctl.

The exception is KVM_RUN, the hot path: Vcpu.run calls libc's ioctl itself, to skip this
function's argument handling on every exit, and raises the same KvmError (kvmits.kvm.vcpu)."""

from __future__ import annotations

import os
import threading

from kvmits import uapi
from kvmits.errors import KvmError

ffi = uapi.ffi
_libc_ioctl = uapi.libc.ioctl
_ULONG0 = ffi.cast("unsigned long", 0)
_get_ident = threading.get_ident     # pthread_self(): see thread_pointer_changed()


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
    me = _get_ident()
    ret = _libc_ioctl(fd, getattr(uapi, name), carg)
    if _get_ident() != me:
        thread_pointer_changed(name, me)
    if ret < 0:
        raise KvmError(name, ffi.errno, detail)
    return ret


def thread_pointer_changed(what: str, before: int) -> None:
    """The ioctl `what` returned to a thread whose pthread_self() is no longer `before`: abort.

    pthread_self() is derived from the thread pointer (TPIDR_EL0 on arm64, FS on x86_64), which
    glibc's TLS, errno and CPython's thread identity hang from. Seen in the testbed with Debian's
    6.1 arm64 kernel in VHE mode: KVM_RUN came back to a vCPU thread with the pointer of another
    vCPU thread of the process (docs/kernels.md, "The testbed: per-CPU state on the wrong CPU
    when the VM count keeps reaching zero"). Two threads then share one TLS (malloc's
    per-thread cache among it) and nothing the process does afterwards can be trusted, so this
    says what happened with bytes and write(2) alone - no Python object is formatted on the
    borrowed TLS - and aborts (a core dump, where enabled, has the rest). Vcpu.run and ioctl()
    check every call: one threading.get_ident() each side, ~55 ns a call (x86 host, timeit),
    against ~1 us for the cheapest KVM ioctl through ioctl().
    """
    os.write(2, b"kvmits: %s returned to a thread whose thread pointer is another thread's "
                b"(pthread_self() was %#x, is %#x): a host kernel bug (docs/kernels.md); aborting\n"
             % (what.encode(), before, _get_ident()))
    os.abort()


def address_of(cdata) -> int:
    """The address of a cffi object, as KVM wants it in a u64 field."""
    return int(ffi.cast("uintptr_t", cdata))
