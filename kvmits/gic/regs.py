"""GICv3 register offsets and the attribute encodings of KVM's vGICv3 / ITS devices.

The ITS's registers (GITS_*) are defined once, with the ITS model: kvmits.its.registers.

Offsets are those of Arm IHI 0069 (GICv3/v4 architecture specification), chapter 12
("Programmers' model"); the attribute encodings are those of the kernel documents
Documentation/virt/kvm/devices/arm-vgic-v3.rst and arm-vgic-its.rst.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmits import uapi

# -- Distributor (GICD_*, IHI 0069 12.9), offsets from the Distributor base ---------------------
GICD_CTLR = 0x0000
GICD_TYPER = 0x0004
GICD_IIDR = 0x0008
GICD_TYPER2 = 0x000C
GICD_IGROUPR = 0x0080
GICD_ISENABLER = 0x0100
GICD_ICENABLER = 0x0180
GICD_ISPENDR = 0x0200
GICD_ICPENDR = 0x0280
GICD_ISACTIVER = 0x0300
GICD_IPRIORITYR = 0x0400
GICD_ICFGR = 0x0C00
GICD_IROUTER = 0x6000
GICD_PIDR2 = 0xFFE8

# -- Redistributor (GICR_*, IHI 0069 12.10/12.11), offsets from the redistributor's RD_base -----
GICR_CTLR = 0x0000
GICR_IIDR = 0x0004
GICR_TYPER = 0x0008          # 64-bit
GICR_WAKER = 0x0014
GICR_PROPBASER = 0x0070      # 64-bit
GICR_PENDBASER = 0x0078      # 64-bit
GICR_PIDR2 = 0xFFE8
#: each redistributor is two 64 KiB frames: RD_base, then SGI_base (IHI 0069 12.10)
GICR_SGI_BASE = 0x10000
GICR_IGROUPR0 = GICR_SGI_BASE + 0x0080
GICR_ISENABLER0 = GICR_SGI_BASE + 0x0100
GICR_ICENABLER0 = GICR_SGI_BASE + 0x0180
GICR_ISPENDR0 = GICR_SGI_BASE + 0x0200
GICR_ISACTIVER0 = GICR_SGI_BASE + 0x0300
GICR_IPRIORITYR = GICR_SGI_BASE + 0x0400
GICR_ICFGR0 = GICR_SGI_BASE + 0x0C00
GICR_ICFGR1 = GICR_SGI_BASE + 0x0C04
#: size of one redistributor (RD_base + SGI_base frames; no VLPI frames on a GICv3 vGIC)
GICR_STRIDE = 0x20000

# -- the vGIC attribute encodings ----------------------------------------------------------------
def mpidr_to_vgic_attr(mpidr: int) -> int:
    """The mpidr field of a GRP_REDIST_REGS / GRP_CPU_SYSREGS attribute (arm-vgic-v3.rst):
    bits 63:56 Aff3, 55:48 Aff2, 47:40 Aff1, 39:32 Aff0, from MPIDR_EL1's Aff3 [39:32],
    Aff2 [23:16], Aff1 [15:8], Aff0 [7:0]."""
    aff0 = mpidr & 0xFF
    aff1 = (mpidr >> 8) & 0xFF
    aff2 = (mpidr >> 16) & 0xFF
    aff3 = (mpidr >> 32) & 0xFF
    return (aff3 << 56) | (aff2 << 48) | (aff1 << 40) | (aff0 << 32)


class SysReg(NamedTuple):
    """An AArch64 system register by its encoding (op0, op1, CRn, CRm, op2)."""

    name: str
    op0: int
    op1: int
    crn: int
    crm: int
    op2: int

    @property
    def encoding(self) -> int:
        """Bits 15:0 of a GRP_CPU_SYSREGS attribute (arm-vgic-v3.rst): Op0 15:14, Op1 13:11,
        CRn 10:7, CRm 6:3, Op2 2:0. The same layout is the low half of a KVM_REG_ARM64_SYSREG id."""
        return (self.op0 << 14) | (self.op1 << 11) | (self.crn << 7) | (self.crm << 3) | self.op2


# The CPU-interface registers that KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS gives access to
# (arm-vgic-v3.rst lists them; encodings from Arm IHI 0069 12.2 / Arm ARM).
ICC_PMR_EL1 = SysReg("ICC_PMR_EL1", 3, 0, 4, 6, 0)
ICC_BPR0_EL1 = SysReg("ICC_BPR0_EL1", 3, 0, 12, 8, 3)
ICC_AP0R0_EL1 = SysReg("ICC_AP0R0_EL1", 3, 0, 12, 8, 4)
ICC_AP0R1_EL1 = SysReg("ICC_AP0R1_EL1", 3, 0, 12, 8, 5)
ICC_AP0R2_EL1 = SysReg("ICC_AP0R2_EL1", 3, 0, 12, 8, 6)
ICC_AP0R3_EL1 = SysReg("ICC_AP0R3_EL1", 3, 0, 12, 8, 7)
ICC_AP1R0_EL1 = SysReg("ICC_AP1R0_EL1", 3, 0, 12, 9, 0)
ICC_AP1R1_EL1 = SysReg("ICC_AP1R1_EL1", 3, 0, 12, 9, 1)
ICC_AP1R2_EL1 = SysReg("ICC_AP1R2_EL1", 3, 0, 12, 9, 2)
ICC_AP1R3_EL1 = SysReg("ICC_AP1R3_EL1", 3, 0, 12, 9, 3)
ICC_BPR1_EL1 = SysReg("ICC_BPR1_EL1", 3, 0, 12, 12, 3)
ICC_CTLR_EL1 = SysReg("ICC_CTLR_EL1", 3, 0, 12, 12, 4)
ICC_SRE_EL1 = SysReg("ICC_SRE_EL1", 3, 0, 12, 12, 5)
ICC_IGRPEN0_EL1 = SysReg("ICC_IGRPEN0_EL1", 3, 0, 12, 12, 6)
ICC_IGRPEN1_EL1 = SysReg("ICC_IGRPEN1_EL1", 3, 0, 12, 12, 7)

ICC_SYSREGS = (ICC_PMR_EL1, ICC_BPR0_EL1, ICC_AP0R0_EL1, ICC_AP0R1_EL1, ICC_AP0R2_EL1, ICC_AP0R3_EL1,
               ICC_AP1R0_EL1, ICC_AP1R1_EL1, ICC_AP1R2_EL1, ICC_AP1R3_EL1, ICC_BPR1_EL1, ICC_CTLR_EL1,
               ICC_SRE_EL1, ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1)

# MPIDR_EL1 (Arm ARM D19.2): read per vCPU through KVM_GET_ONE_REG, it is what the device tree's
# cpu reg and the vGIC's mpidr-encoded attributes need.
MPIDR_EL1 = SysReg("MPIDR_EL1", 3, 0, 0, 0, 5)
#: the affinity fields of MPIDR_EL1: Aff3 [39:32], Aff2 [23:16], Aff1 [15:8], Aff0 [7:0]
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF

def arm64_sysreg_id(reg: SysReg) -> int:
    """The KVM_GET/SET_ONE_REG id of a 64-bit AArch64 system register (api.rst, arm64 registers)."""
    return uapi.KVM_REG_ARM64 | uapi.KVM_REG_SIZE_U64 | uapi.KVM_REG_ARM64_SYSREG | reg.encoding
