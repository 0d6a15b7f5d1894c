"""The in-kernel ITS (KVM_DEV_TYPE_ARM_VGIC_ITS).

Each method is one device attribute of Documentation/virt/kvm/devices/arm-vgic-its.rst. Like the
vGICv3's, every attribute access needs all vCPUs of the VM outside KVM_RUN, else EBUSY: pause
them first (kvmits.machine.Machine.pause_all / paused()). KVM_SIGNAL_MSI and irqfds need no pause.
"""

from __future__ import annotations

from kvmits import uapi
from kvmits.its.registers import GITS_TRANSLATER, ITS_FRAME_SIZE

_GRP_ADDR = uapi.KVM_DEV_ARM_VGIC_GRP_ADDR
_GRP_CTRL = uapi.KVM_DEV_ARM_VGIC_GRP_CTRL
_GRP_ITS_REGS = uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS


class KernelIts:
    """One in-kernel ITS: its 128 KiB frame address, init, GITS_* register access, table
    save/restore and reset. The vGICv3 must exist first and is initialised after this ITS.

    Every attribute access needs all vCPUs outside KVM_RUN, else KvmError(EBUSY).
    """

    def __init__(self, vm):
        self.vm = vm
        self.device = vm.create_device(uapi.KVM_DEV_TYPE_ARM_VGIC_ITS)
        self.base: int | None = None

    @classmethod
    def initialised(cls, vm, base: int) -> KernelIts:
        """A new ITS with its frame at `base` and KVM_DEV_ARM_VGIC_CTRL_INIT done: what the
        vGIC's own CTRL_INIT must come after (arm-vgic-its.rst)."""
        its = cls(vm)
        its.set_base(base)
        its.ctrl_init()
        return its

    # -- KVM_DEV_ARM_VGIC_GRP_ADDR / GRP_CTRL --------------------------------------------------
    def set_base(self, gpa: int) -> None:
        """KVM_VGIC_ITS_ADDR_TYPE: the ITS frame's 64 KiB-aligned guest-physical base (128 KiB:
        control frame, then the translation frame with GITS_TRANSLATER)."""
        if gpa % 0x10000:
            raise ValueError(f"ITS base {gpa:#x} is not 64 KiB-aligned")
        self.device.set_attr(_GRP_ADDR, uapi.KVM_VGIC_ITS_ADDR_TYPE, gpa)
        self.base = gpa

    def get_base(self) -> int:
        return self.device.get_attr(_GRP_ADDR, uapi.KVM_VGIC_ITS_ADDR_TYPE)

    @property
    def size(self) -> int:
        return ITS_FRAME_SIZE

    @property
    def doorbell(self) -> int:
        """Guest-physical address of GITS_TRANSLATER: the MSI address for KVM_SIGNAL_MSI and MSI routes."""
        if self.base is None:
            raise RuntimeError("ITS base address not set")
        return self.base + GITS_TRANSLATER

    def ctrl_init(self) -> None:
        """KVM_DEV_ARM_VGIC_CTRL_INIT (after set_base, before the vGIC's own ctrl_init)."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)

    def save_tables(self) -> None:
        """KVM_DEV_ARM_ITS_SAVE_TABLES: write the device, collection and interrupt translation
        tables into guest memory where GITS_BASER<n>/the ITTs point. vCPUs paused; the memory
        must be writable by KVM (a KVM_MEM_READONLY slot gives EFAULT)."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_ITS_SAVE_TABLES)

    def restore_tables(self) -> None:
        """KVM_DEV_ARM_ITS_RESTORE_TABLES: rebuild the ITS's state from the tables in guest
        memory (after GITS_IIDR, BASERs, CBASER, CREADR/CWRITER were restored). vCPUs paused."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_ITS_RESTORE_TABLES)

    def ctrl_reset(self) -> None:
        """KVM_DEV_ARM_ITS_CTRL_RESET: reset to the power-on state (GITS_CTLR.Enabled = 0, BASERs
        and CBASER invalid, caches emptied). vCPUs paused."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_ITS_CTRL_RESET)

    def has_ctrl_reset(self) -> bool:
        """Does this kernel know KVM_DEV_ARM_ITS_CTRL_RESET (added after the ITS itself)?"""
        return self.device.has_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_ITS_CTRL_RESET)

    # -- KVM_DEV_ARM_VGIC_GRP_ITS_REGS ---------------------------------------------------------
    def get_reg(self, offset: int) -> int:
        """Read the GITS_* register at `offset` (kvmits.gic.regs), always as a u64 (arm-vgic-its.rst:
        the value is 64-bit whatever the register's width). vCPUs paused."""
        return self.device.get_attr(_GRP_ITS_REGS, offset)

    def set_reg(self, offset: int, value: int) -> None:
        """Write GITS_CTLR, GITS_CBASER, GITS_CWRITER, GITS_BASER<n> (or, for a restore,
        GITS_IIDR, GITS_CREADR). A write to GITS_CWRITER or GITS_CTLR runs the queued commands
        before the ioctl returns. vCPUs paused."""
        self.device.set_attr(_GRP_ITS_REGS, offset, value)

    def close(self) -> None:
        self.device.close()
