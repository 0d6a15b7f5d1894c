"""A VM fd: memory slots, vCPUs, devices, MSIs, GSI routing, irqfd, irq lines."""

from __future__ import annotations

import errno
import os
import threading
from typing import NamedTuple

from kvmits import uapi
from kvmits.errors import KvmError
from kvmits.kvm._ioctl import ioctl
from kvmits.kvm.device import Device
from kvmits.kvm.eventfd import EventFd
from kvmits.kvm.memory import GuestMemory
from kvmits.kvm.vcpu import Vcpu

ffi = uapi.ffi


class MsiRoute(NamedTuple):
    """A GSI routed to an MSI (KVM_IRQ_ROUTING_MSI). `devid` set -> KVM_MSI_VALID_DEVID, which
    arm64 needs to tell the ITS the DeviceID (api.rst, 4.52 KVM_SET_GSI_ROUTING)."""

    gsi: int
    address: int
    data: int
    devid: int | None = None


class IrqchipRoute(NamedTuple):
    """A GSI routed to an irqchip pin (KVM_IRQ_ROUTING_IRQCHIP)."""

    gsi: int
    irqchip: int
    pin: int


class Vm:
    """One VM. Closing it closes its vCPUs, devices and irqfds (not the GuestMemory objects,
    which the caller owns and may close after the VM)."""

    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: dict[int, Vcpu] = {}
        self.devices: list[Device] = []
        self.memory: dict[int, tuple[GuestMemory, int]] = {}   # slot -> (memory, flags)
        self._irqfds: set[tuple[int, int]] = set()
        self._msi = ffi.new("struct kvm_msi *")
        self._msi_lock = threading.Lock()
        self._irq_level = ffi.new("struct kvm_irq_level *")

    # -- capabilities ------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers, e.g. KVM_CAP_MSI_DEVID, depend on the VM)."""
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    # -- memory ------------------------------------------------------------------------------
    def add_memory(self, mem: GuestMemory, readonly: bool = False, slot: int | None = None) -> int:
        """Map `mem` at its guest-physical address (KVM_SET_USER_MEMORY_REGION); returns the slot."""
        if slot is None:
            slot = next(i for i in range(len(self.memory) + 1) if i not in self.memory)
        flags = uapi.KVM_MEM_READONLY if readonly else 0
        self._set_region(slot, flags, mem.gpa, mem.size, mem.host_addr)
        self.memory[slot] = (mem, flags)
        return slot

    def remove_memory(self, slot: int) -> None:
        mem, _ = self.memory.pop(slot)
        self._set_region(slot, 0, mem.gpa, 0, 0)   # memory_size 0 deletes the slot

    def _set_region(self, slot, flags, gpa, size, host_addr) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region, detail=f"slot {slot} gpa={gpa:#x} size={size:#x}")

    def memory_at(self, gpa: int, size: int = 1) -> GuestMemory | None:
        """The mapped GuestMemory holding [gpa, gpa + size), if any."""
        for mem, _ in self.memory.values():
            if mem.contains(gpa, size):
                return mem
        return None

    # -- vCPUs and devices -------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl(self.fd, "KVM_CREATE_VCPU", index, detail=f"vcpu {index}")
        try:
            vcpu = Vcpu(self, fd, index, self.kvm.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus[index] = vcpu
        return vcpu

    def arm_preferred_target(self):
        """KVM_ARM_PREFERRED_TARGET: a kvm_vcpu_init with the target this host prefers."""
        init = ffi.new("struct kvm_vcpu_init *")
        ioctl(self.fd, "KVM_ARM_PREFERRED_TARGET", init)
        return init

    def create_device(self, dev_type: int) -> Device:
        cd = ffi.new("struct kvm_create_device *", {"type": dev_type})
        ioctl(self.fd, "KVM_CREATE_DEVICE", cd, detail=f"type={dev_type}")
        dev = Device(self, cd.fd, dev_type)
        self.devices.append(dev)
        return dev

    def device_supported(self, dev_type: int) -> bool:
        """KVM_CREATE_DEVICE with KVM_CREATE_DEVICE_TEST: can this VM have such a device?"""
        cd = ffi.new("struct kvm_create_device *", {"type": dev_type, "flags": uapi.KVM_CREATE_DEVICE_TEST})
        try:
            ioctl(self.fd, "KVM_CREATE_DEVICE", cd)
        except KvmError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return False
            raise
        return True

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP (x86: PIC + IOAPIC + local APICs; arm64 uses create_device)."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    # -- interrupts --------------------------------------------------------------------------
    def signal_msi(self, address: int, data: int, devid: int | None = None) -> int:
        """KVM_SIGNAL_MSI. Returns 1 if delivered, 0 if the guest blocked it (e.g. an ITS
        translation miss); errors (EBUSY while the ITS is disabled, EINVAL, ...) raise KvmError."""
        with self._msi_lock:
            m = self._msi
            m.address_lo = address & 0xFFFFFFFF
            m.address_hi = address >> 32
            m.data = data
            if devid is None:
                m.flags = 0
                m.devid = 0
            else:
                m.flags = uapi.KVM_MSI_VALID_DEVID
                m.devid = devid
            return ioctl(self.fd, "KVM_SIGNAL_MSI", m, detail=f"address={address:#x} data={data:#x} devid={devid}")

    def set_gsi_routing(self, routes) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with `routes`."""
        routes = list(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, route in enumerate(routes):
            e = table.entries[i]
            e.gsi = route.gsi
            if isinstance(route, MsiRoute):
                e.type = uapi.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = route.address & 0xFFFFFFFF
                e.u.msi.address_hi = route.address >> 32
                e.u.msi.data = route.data
                if route.devid is not None:
                    e.flags = uapi.KVM_MSI_VALID_DEVID
                    e.u.msi.devid = route.devid
            elif isinstance(route, IrqchipRoute):
                e.type = uapi.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = route.irqchip
                e.u.irqchip.pin = route.pin
            else:
                raise TypeError(f"not a route: {route!r}")
        ioctl(self.fd, "KVM_SET_GSI_ROUTING", table, detail=f"{len(routes)} routes")

    def irqfd(self, efd: EventFd, gsi: int) -> None:
        """KVM_IRQFD: a write to `efd` injects `gsi` without waking userspace."""
        req = ffi.new("struct kvm_irqfd *", {"fd": efd.fileno(), "gsi": gsi})
        ioctl(self.fd, "KVM_IRQFD", req, detail=f"fd={efd.fileno()} gsi={gsi}")
        self._irqfds.add((efd.fileno(), gsi))

    def irqfd_deassign(self, efd: EventFd, gsi: int) -> None:
        req = ffi.new("struct kvm_irqfd *", {"fd": efd.fileno(), "gsi": gsi, "flags": uapi.KVM_IRQFD_FLAG_DEASSIGN})
        ioctl(self.fd, "KVM_IRQFD", req, detail=f"deassign fd={efd.fileno()} gsi={gsi}")
        self._irqfds.discard((efd.fileno(), gsi))

    def ioeventfd(self, efd: EventFd, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of `length` bytes (1, 2, 4 or 8; 0: any) to `addr`
        signals `efd` inside the kernel, with no KVM_EXIT_MMIO (KVM_EXIT_IO with `pio`, x86
        only); with `datamatch`, only writes of that value (api.rst 4.59). The write completes
        at once for the guest: what it wrote is not kept, only the count."""
        ioctl(self.fd, "KVM_IOEVENTFD", self._ioeventfd_request(efd, addr, length, datamatch, pio, 0),
              detail=self._ioeventfd_detail(efd, addr, length, datamatch, pio))

    def ioeventfd_deassign(self, efd: EventFd, addr: int, length: int, datamatch: int | None = None,
                           pio: bool = False) -> None:
        """Remove an ioeventfd: the arguments must be the ones it was assigned with (ENOENT otherwise)."""
        ioctl(self.fd, "KVM_IOEVENTFD",
              self._ioeventfd_request(efd, addr, length, datamatch, pio, uapi.KVM_IOEVENTFD_FLAG_DEASSIGN),
              detail="deassign " + self._ioeventfd_detail(efd, addr, length, datamatch, pio))

    @staticmethod
    def _ioeventfd_request(efd: EventFd, addr: int, length: int, datamatch, pio: bool, flags: int):
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        return ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr, "len": length,
                                                  "fd": efd.fileno(), "flags": flags})

    @staticmethod
    def _ioeventfd_detail(efd: EventFd, addr: int, length: int, datamatch, pio: bool) -> str:
        match = "" if datamatch is None else f" datamatch={datamatch:#x}"
        return f"fd={efd.fileno()} {'pio' if pio else 'mmio'}={addr:#x} len={length}{match}"

    def irq_line(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE. On arm64 `irq` packs type, vCPU and number (api.rst, 4.25); see arm_irq()."""
        self._irq_level.irq = irq
        self._irq_level.level = level
        return ioctl(self.fd, "KVM_IRQ_LINE", self._irq_level, detail=f"irq={irq:#x} level={level}")

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.fd < 0:
            return
        for vcpu in self.vcpus.values():
            vcpu.close()
        for dev in self.devices:
            dev.close()
        self.vcpus.clear()
        self.devices.clear()
        self._irqfds.clear()     # KVM drops irqfds with the VM
        os.close(self.fd)
        self.fd = -1
        self.memory.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def arm_irq(irq_type: int, number: int, vcpu: int = 0) -> int:
    """The arm64 KVM_IRQ_LINE irq field: type (SPI/PPI/CPU), vCPU index and number."""
    vcpu2 = (vcpu >> 8) & uapi.KVM_ARM_IRQ_VCPU2_MASK
    return ((vcpu2 << uapi.KVM_ARM_IRQ_VCPU2_SHIFT) | (irq_type << uapi.KVM_ARM_IRQ_TYPE_SHIFT)
            | ((vcpu & uapi.KVM_ARM_IRQ_VCPU_MASK) << uapi.KVM_ARM_IRQ_VCPU_SHIFT) | (number & uapi.KVM_ARM_IRQ_NUM_MASK))
