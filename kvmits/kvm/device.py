"""A KVM device fd (KVM_CREATE_DEVICE): attribute access (Documentation/virt/kvm/devices/)."""

from __future__ import annotations

import errno
import os

from kvmits import uapi
from kvmits.errors import KvmError
from kvmits.kvm._ioctl import address_of, ioctl

ffi = uapi.ffi


class Device:
    """An in-kernel device: set, get and probe attributes (group, attr).

    Values travel through a u64 buffer; `width=4` for the attributes the kernel documents as
    pointing to a __u32 (e.g. KVM_DEV_ARM_VGIC_GRP_NR_IRQS, GRP_DIST_REGS, GRP_REDIST_REGS).
    """

    def __init__(self, vm, fd: int, dev_type: int):
        self.vm = vm
        self.fd = fd
        self.type = dev_type
        self._attr = ffi.new("struct kvm_device_attr *")
        self._buf = ffi.new("uint64_t *")
        self._buf_addr = address_of(self._buf)

    def _prepare(self, group: int, attr: int, value: int | None, width: int):
        if width not in (4, 8):
            raise ValueError("width must be 4 or 8")
        a = self._attr
        a.flags = 0
        a.group = group
        a.attr = attr
        if value is None:
            a.addr = 0
        else:
            self._buf[0] = value & ((1 << (8 * width)) - 1)
            a.addr = self._buf_addr
        return a

    def set_attr(self, group: int, attr: int, value: int | None = None, width: int = 8) -> None:
        a = self._prepare(group, attr, value, width)
        ioctl(self.fd, "KVM_SET_DEVICE_ATTR", a, detail=f"group={group} attr={attr:#x}")

    def get_attr(self, group: int, attr: int, width: int = 8) -> int:
        a = self._prepare(group, attr, 0, width)
        ioctl(self.fd, "KVM_GET_DEVICE_ATTR", a, detail=f"group={group} attr={attr:#x}")
        return self._buf[0] & ((1 << (8 * width)) - 1)

    def has_attr(self, group: int, attr: int) -> bool:
        a = self._prepare(group, attr, None, 8)
        try:
            ioctl(self.fd, "KVM_HAS_DEVICE_ATTR", a)
        except KvmError as exc:
            if exc.errno == errno.ENXIO:   # "the attribute is not supported" (api.rst, 4.81)
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
