"""The in-kernel GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3).

Each method is one device attribute of Documentation/virt/kvm/devices/arm-vgic-v3.rst, named
after it. The kernel rejects most attribute accesses with EBUSY while any vCPU of the VM is
inside KVM_RUN (it takes every vCPU's mutex, and KVM_RUN holds it, also while a vCPU sleeps in
WFI): pause the vCPUs first (kvmits.machine.Machine.pause_all / paused()).
"""

from __future__ import annotations

from kvmits import uapi
from kvmits.gic.regs import GICR_STRIDE, SysReg, mpidr_to_vgic_attr

_GRP_ADDR = uapi.KVM_DEV_ARM_VGIC_GRP_ADDR
_GRP_DIST_REGS = uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
_GRP_REDIST_REGS = uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
_GRP_CPU_SYSREGS = uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
_GRP_NR_IRQS = uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS
_GRP_CTRL = uapi.KVM_DEV_ARM_VGIC_GRP_CTRL
_GRP_LEVEL_INFO = uapi.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO

#: GICD is one 64 KiB frame (IHI 0069 12.8)
GICD_SIZE = 0x10000


class VGicV3:
    """KVM's emulated GICv3: Distributor, one redistributor per vCPU, and the vCPUs' CPU interfaces.

    Bring-up order (arm-vgic-v3.rst, and what the testbed confirmed): create the vCPUs, create
    this device, set the Distributor and redistributor addresses and the number of IRQs, create
    and initialise any ITS, then ctrl_init(). No vCPU may be created after ctrl_init().

    Every attribute access below needs all vCPUs of the VM outside KVM_RUN, else the kernel
    answers EBUSY (kvmits.errors.KvmError with errno EBUSY): use Machine.pause_all() / paused().
    """

    def __init__(self, vm):
        self.vm = vm
        self.device = vm.create_device(uapi.KVM_DEV_TYPE_ARM_VGIC_V3)
        self.dist_base: int | None = None
        self.redist_base: int | None = None

    # -- KVM_DEV_ARM_VGIC_GRP_ADDR -------------------------------------------------------------
    def set_dist_base(self, gpa: int) -> None:
        """KVM_VGIC_V3_ADDR_TYPE_DIST: the Distributor's 64 KiB-aligned guest-physical base."""
        self.device.set_attr(_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_DIST, gpa)
        self.dist_base = gpa

    def set_redist_base(self, gpa: int) -> None:
        """KVM_VGIC_V3_ADDR_TYPE_REDIST: base of one contiguous region holding a 128 KiB
        redistributor per vCPU, in vCPU-index order."""
        self.device.set_attr(_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST, gpa)
        self.redist_base = gpa

    def set_redist_region(self, index: int, gpa: int, count: int) -> None:
        """KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION: region `index` of `count` redistributors at `gpa`
        (value: count [63:52], base [51:16], flags [15:12] = 0, index [11:0])."""
        if count <= 0 or count >= 1 << 12 or gpa & 0xFFFF or index >= 1 << 12:
            raise ValueError(f"bad redistributor region: index={index} gpa={gpa:#x} count={count}")
        value = (count << 52) | (gpa & 0x000F_FFFF_FFFF_0000) | index
        self.device.set_attr(_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION, value)
        if index == 0:
            self.redist_base = gpa

    def get_dist_base(self) -> int:
        return self.device.get_attr(_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_DIST)

    def get_redist_base(self) -> int:
        return self.device.get_attr(_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST)

    def redist_base_of(self, cpu: int) -> int:
        """Guest-physical RD_base of vCPU `cpu`'s redistributor (single-region layout)."""
        if self.redist_base is None:
            raise RuntimeError("redistributor base not set")
        return self.redist_base + cpu * GICR_STRIDE

    # -- KVM_DEV_ARM_VGIC_GRP_NR_IRQS / GRP_CTRL -----------------------------------------------
    def set_nr_irqs(self, nr_irqs: int) -> None:
        """KVM_DEV_ARM_VGIC_GRP_NR_IRQS: total interrupts (32 private + SPIs), a multiple of 32,
        64..1024. A __u32 value."""
        if nr_irqs % 32 or not 64 <= nr_irqs <= 1024:
            raise ValueError(f"nr_irqs must be a multiple of 32 in 64..1024, not {nr_irqs}")
        self.device.set_attr(_GRP_NR_IRQS, 0, nr_irqs, width=4)

    def get_nr_irqs(self) -> int:
        return self.device.get_attr(_GRP_NR_IRQS, 0, width=4)

    def ctrl_init(self) -> None:
        """KVM_DEV_ARM_VGIC_CTRL_INIT: initialise the vGIC (after addresses and any ITS)."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_VGIC_CTRL_INIT)

    def save_pending_tables(self) -> None:
        """KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES: flush LPI pending state into the guest's
        pending tables (GICR_PENDBASER). vCPUs paused."""
        self.device.set_attr(_GRP_CTRL, uapi.KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES)

    # -- register access: GRP_DIST_REGS / GRP_REDIST_REGS (32-bit) / GRP_CPU_SYSREGS (64-bit) ---
    def get_dist_reg(self, offset: int) -> int:
        """KVM_DEV_ARM_VGIC_GRP_DIST_REGS read of the 32-bit GICD register at `offset`.
        64-bit registers (GICD_IROUTER<n>) are read as two words. vCPUs paused."""
        return self.device.get_attr(_GRP_DIST_REGS, offset, width=4)

    def set_dist_reg(self, offset: int, value: int) -> None:
        """KVM_DEV_ARM_VGIC_GRP_DIST_REGS write (writes to read-only registers are ignored). vCPUs paused."""
        self.device.set_attr(_GRP_DIST_REGS, offset, value, width=4)

    def get_redist_reg(self, mpidr: int, offset: int) -> int:
        """KVM_DEV_ARM_VGIC_GRP_REDIST_REGS read of a 32-bit register of the redistributor of
        the vCPU whose MPIDR_EL1 is `mpidr`; `offset` from RD_base (SGI_base registers are at
        0x10000 + offset: kvmits.gic.regs.GICR_SGI_BASE). vCPUs paused."""
        return self.device.get_attr(_GRP_REDIST_REGS, mpidr_to_vgic_attr(mpidr) | offset, width=4)

    def set_redist_reg(self, mpidr: int, offset: int, value: int) -> None:
        """KVM_DEV_ARM_VGIC_GRP_REDIST_REGS write. vCPUs paused."""
        self.device.set_attr(_GRP_REDIST_REGS, mpidr_to_vgic_attr(mpidr) | offset, value, width=4)

    def get_redist_reg64(self, mpidr: int, offset: int) -> int:
        """A 64-bit redistributor register (GICR_TYPER, GICR_PROPBASER, ...) as its two words,
        which is how arm-vgic-v3.rst says 64-bit registers are accessed. vCPUs paused."""
        return self.get_redist_reg(mpidr, offset) | (self.get_redist_reg(mpidr, offset + 4) << 32)

    def set_redist_reg64(self, mpidr: int, offset: int, value: int) -> None:
        """A 64-bit redistributor register written as its two words, low first. vCPUs paused."""
        self.set_redist_reg(mpidr, offset, value & 0xFFFF_FFFF)
        self.set_redist_reg(mpidr, offset + 4, value >> 32)

    def _level_attr(self, mpidr: int, intid: int) -> int:
        if intid % 32 or not 0 <= intid <= uapi.KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK:
            raise ValueError(f"line levels come 32 at a time from a multiple of 32, not INTID {intid}")
        return (mpidr_to_vgic_attr(mpidr) | uapi.VGIC_LEVEL_INFO_LINE_LEVEL << uapi.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT
                | intid)

    def get_line_levels(self, mpidr: int, intid: int) -> int:
        """KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO: the input line level of the 32 interrupts from
        `intid` (a multiple of 32; bit n is INTID intid + n), as the devices drive them, which
        the pending state of a level-sensitive interrupt does not tell. `mpidr` names the vCPU
        for private interrupts. vCPUs paused."""
        return self.device.get_attr(_GRP_LEVEL_INFO, self._level_attr(mpidr, intid), width=4)

    def set_line_levels(self, mpidr: int, intid: int, levels: int) -> None:
        self.device.set_attr(_GRP_LEVEL_INFO, self._level_attr(mpidr, intid), levels, width=4)

    def get_cpu_sysreg(self, mpidr: int, reg: SysReg) -> int:
        """KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS read of ICC_* register `reg` (kvmits.gic.regs) of the
        vCPU whose MPIDR_EL1 is `mpidr`. 64-bit. vCPUs paused."""
        return self.device.get_attr(_GRP_CPU_SYSREGS, mpidr_to_vgic_attr(mpidr) | reg.encoding)

    def set_cpu_sysreg(self, mpidr: int, reg: SysReg, value: int) -> None:
        """KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS write. vCPUs paused."""
        self.device.set_attr(_GRP_CPU_SYSREGS, mpidr_to_vgic_attr(mpidr) | reg.encoding, value)

    def close(self) -> None:
        self.device.close()
