"""kvmits.gic: attribute encodings and the calls the wrappers make (a recording fake device)."""

from __future__ import annotations

import pytest

from kvmits import uapi
from kvmits.gic import KernelIts, VGicV3, regs
from kvmits.its import registers as R


class RecordingDevice:
    def __init__(self, dev_type, answers=None):
        self.type = dev_type
        self.calls = []
        self.answers = answers or {}

    def set_attr(self, group, attr, value=None, width=8):
        self.calls.append(("set", group, attr, value, width))

    def get_attr(self, group, attr, width=8):
        self.calls.append(("get", group, attr, None, width))
        return self.answers.get((group, attr), 0)

    def has_attr(self, group, attr):
        self.calls.append(("has", group, attr, None, 8))
        return (group, attr) in self.answers

    def close(self):
        pass


class FakeVm:
    def __init__(self, answers=None):
        self.devices = []
        self.answers = answers

    def create_device(self, dev_type):
        dev = RecordingDevice(dev_type, self.answers)
        self.devices.append(dev)
        return dev


def test_mpidr_attr_encoding_follows_arm_vgic_v3_rst():
    # MPIDR Aff3=0x11 [39:32], Aff2=0x22 [23:16], Aff1=0x33 [15:8], Aff0=0x44 [7:0]
    mpidr = (0x11 << 32) | (0x22 << 16) | (0x33 << 8) | 0x44 | (1 << 31)   # bit 31 is RES1, not affinity
    assert regs.mpidr_to_vgic_attr(mpidr) == 0x11223344_00000000
    assert regs.mpidr_to_vgic_attr(0x80000001) == 0x00000001_00000000


def test_sysreg_encodings():
    # Op0 15:14, Op1 13:11, CRn 10:7, CRm 6:3, Op2 2:0
    assert regs.ICC_SRE_EL1.encoding == (3 << 14) | (12 << 7) | (12 << 3) | 5 == 0xC665
    assert regs.ICC_PMR_EL1.encoding == (3 << 14) | (4 << 7) | (6 << 3) == 0xC230
    # KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | ARM64_SYS_REG(3, 0, 0, 0, 5)
    assert regs.arm64_sysreg_id(regs.MPIDR_EL1) == 0x6030_0000_0013_C005
    assert len({r.encoding for r in regs.ICC_SYSREGS}) == len(regs.ICC_SYSREGS)


def test_gits_baser_offsets():
    assert R.GITS_BASER(0) == 0x100 and R.GITS_BASER(7) == 0x138
    with pytest.raises(ValueError):
        R.GITS_BASER(8)


def test_vgic_bring_up_calls():
    vm = FakeVm()
    gic = VGicV3(vm)
    dev = vm.devices[0]
    assert dev.type == uapi.KVM_DEV_TYPE_ARM_VGIC_V3
    gic.set_dist_base(0x08000000)
    gic.set_redist_base(0x080A0000)
    gic.set_nr_irqs(128)
    gic.ctrl_init()
    assert dev.calls == [
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_DIST, 0x08000000, 8),
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST, 0x080A0000, 8),
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, 128, 4),          # a __u32 attribute
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_CTRL, uapi.KVM_DEV_ARM_VGIC_CTRL_INIT, None, 8),
    ]
    assert gic.redist_base_of(2) == 0x080A0000 + 2 * 0x20000


def test_vgic_register_access_encodes_mpidr_and_width():
    vm = FakeVm({(uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, (1 << 32) | regs.GICR_TYPER): 0x100000011,
                 (uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, (1 << 32) | (regs.GICR_TYPER + 4)): 0x1})
    gic = VGicV3(vm)
    dev = vm.devices[0]
    gic.get_dist_reg(regs.GICD_TYPER)
    gic.set_redist_reg(0x80000001, regs.GICR_CTLR, 1)
    gic.get_cpu_sysreg(0x80000001, regs.ICC_SRE_EL1)
    assert dev.calls == [
        ("get", uapi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, regs.GICD_TYPER, None, 4),
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, (1 << 32) | regs.GICR_CTLR, 1, 4),
        ("get", uapi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, (1 << 32) | 0xC665, None, 8),
    ]
    # a 64-bit redistributor register is two 32-bit accesses (arm-vgic-v3.rst)
    assert gic.get_redist_reg64(0x80000001, regs.GICR_TYPER) == (0x1 << 32) | 0x100000011


def test_vgic_validates_before_the_kernel():
    gic = VGicV3(FakeVm())
    for bad in (32, 100, 2048):
        with pytest.raises(ValueError):
            gic.set_nr_irqs(bad)
    with pytest.raises(ValueError):
        gic.set_redist_region(0, 0x080A1000, 2)      # not 64 KiB-aligned
    gic.set_redist_region(1, 0x1_0000_0000, 3)
    assert gic.device.calls[-1] == ("set", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION,
                                    (3 << 52) | 0x1_0000_0000 | 1, 8)


def test_its_calls_and_doorbell():
    vm = FakeVm({(uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, R.GITS_IIDR): 0x4B00043B})
    its = KernelIts(vm)
    dev = vm.devices[0]
    assert dev.type == uapi.KVM_DEV_TYPE_ARM_VGIC_ITS
    with pytest.raises(RuntimeError):
        _ = its.doorbell
    with pytest.raises(ValueError):
        its.set_base(0x08081000)
    its.set_base(0x08080000)
    its.ctrl_init()
    assert its.doorbell == 0x08090040
    assert its.get_reg(R.GITS_IIDR) == 0x4B00043B
    its.set_reg(R.GITS_CWRITER, 0x20)
    its.save_tables()
    its.restore_tables()
    its.ctrl_reset()
    grp_ctrl = uapi.KVM_DEV_ARM_VGIC_GRP_CTRL
    assert dev.calls == [
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_ADDR, uapi.KVM_VGIC_ITS_ADDR_TYPE, 0x08080000, 8),
        ("set", grp_ctrl, uapi.KVM_DEV_ARM_VGIC_CTRL_INIT, None, 8),
        ("get", uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, R.GITS_IIDR, None, 8),
        ("set", uapi.KVM_DEV_ARM_VGIC_GRP_ITS_REGS, R.GITS_CWRITER, 0x20, 8),
        ("set", grp_ctrl, uapi.KVM_DEV_ARM_ITS_SAVE_TABLES, None, 8),
        ("set", grp_ctrl, uapi.KVM_DEV_ARM_ITS_RESTORE_TABLES, None, 8),
        ("set", grp_ctrl, uapi.KVM_DEV_ARM_ITS_CTRL_RESET, None, 8),
    ]
