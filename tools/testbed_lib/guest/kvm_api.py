"""Minimal KVM check for `tools/testbed probe`, runs in the arm64 guest (Python 3.11, cffi 1.15
in ABI mode: the guest has no compiler). Used until kvmits has its own `probe` command.

Opens /dev/kvm, asks KVM_GET_API_VERSION (must be 12, Documentation/virt/kvm/api.rst 4.1)
and creates and closes one VM. Exit status 0 when both work.
"""

import os
import sys

import cffi

# _IO(KVMIO, n) with KVMIO = 0xAE: include/uapi/linux/kvm.h
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

ffi = cffi.FFI()
ffi.cdef("int ioctl(int fd, unsigned long request, ...);")
libc = ffi.dlopen(None)


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    ret = libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return ret


def main() -> int:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    version = ioctl(kvm, KVM_GET_API_VERSION)
    print(f"KVM_GET_API_VERSION = {version}")
    if version != KVM_API_VERSION:
        print(f"probe: FAIL: expected API version {KVM_API_VERSION}")
        return 1
    vm = ioctl(kvm, KVM_CREATE_VM, 0)
    print(f"KVM_CREATE_VM: vm fd {vm}")
    os.close(vm)
    os.close(kvm)
    print("probe: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
