"""The /dev/kvm system fd."""

from __future__ import annotations

import os

from kvmits.errors import KvmError
from kvmits.kvm._ioctl import ioctl
from kvmits.kvm.vm import Vm

DEFAULT_DEVICE = "/dev/kvm"


class Kvm:
    """/dev/kvm: the API version, capabilities, the vCPU mmap size, and VM creation."""

    def __init__(self, path: str = DEFAULT_DEVICE):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open({path})", exc.errno) from exc
        self.api_version = ioctl(self.fd, "KVM_GET_API_VERSION")
        self._vcpu_mmap_size: int | None = None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 = unsupported, >0 = supported (some caps return a value)."""
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    @property
    def vcpu_mmap_size(self) -> int:
        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")
        return self._vcpu_mmap_size

    def create_vm(self, machine_type: int = 0) -> Vm:
        """KVM_CREATE_VM. On arm64 the low byte of `machine_type` selects the IPA size
        (KVM_VM_TYPE_ARM_IPA_SIZE; 0 = the default 40 bits)."""
        fd = ioctl(self.fd, "KVM_CREATE_VM", machine_type, detail=f"type={machine_type:#x}")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
