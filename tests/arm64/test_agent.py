"""The guest agent on real arm64 KVM with the in-kernel vGICv3 (and ITS): boot, HELLO from every
vCPU, loads/stores/system registers performed by the guest and checked against KVM's own view,
interrupts reported per vCPU, a timed read, PSCI SYSTEM_OFF.

Runs natively on an arm64 KVM host, or on x86_64 in the testbed:
    tools/testbed run -- python3 -m pytest tests/arm64/test_agent.py -v
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import arm64_kvm_unavailable_reason

from kvmits.gic.regs import (GICD_CTLR, GICD_TYPER, GICR_IGROUPR0, GICR_ISENABLER0, GICR_TYPER, ICC_IGRPEN1_EL1,
                             ICC_PMR_EL1)
from kvmits.machine.agent import (AgentRequestFailed, ErrorCode, IrqMode, Op, SysReg, guest_program,
                                  kvm_default_mpidr)

pytestmark = pytest.mark.arm64

TIMEOUT = 60.0          # TCG-emulated arm64 under the testbed is slow: generous, never a speed test
NR_IRQS = 128
GICD_TYPER_LPIS = 1 << 17
GICR_TYPER_PLPIS = 1 << 0
GICR_TYPER_LAST = 1 << 4
GICD_CTLR_ENABLE_GRP1 = 1 << 1
GICD_CTLR_ARE = 1 << 4
TIMER_PPI = 27
SGI = 3


def _arm64_kvm_missing() -> str | None:
    return arm64_kvm_unavailable_reason()


def boot(cpus: int, its: str | None = "kernel"):
    """A started machine running the agent, every vCPU online."""
    reason = _arm64_kvm_missing()
    if reason:
        pytest.skip(reason)
    from kvmits.machine import Machine, MachineConfig

    m = Machine(MachineConfig(cpus=cpus, mem_size=64 << 20, its=its, nr_irqs=NR_IRQS, agent=True))
    try:
        m.load(guest_program("agent"))
        m.start()
        m.agent.wait_online([0], TIMEOUT)
        if cpus > 1:
            m.agent.start_cpus(cpus, timeout=TIMEOUT)
    except BaseException:
        m.close()
        raise
    return m


@pytest.fixture(scope="module")
def m4():
    m = boot(4)
    yield m
    m.close()


@pytest.fixture
def m1():
    m = boot(1)
    yield m
    m.close()


def test_one_vcpu_boots_reads_the_gic_and_powers_off(m1):
    agent = m1.agent
    gicd = m1.memmap.gicd.base
    assert agent.mpidr(0) & 0xFF_00FF_FFFF == m1.mpidrs[0] & 0xFF_00FF_FFFF
    typer = agent.read(0, gicd + GICD_TYPER, 4, timeout=TIMEOUT)
    ctlr = agent.read(0, gicd + GICD_CTLR, 4, timeout=TIMEOUT)
    rd_typer = agent.read(0, m1.memmap.gicr_base(0) + GICR_TYPER, 8, timeout=TIMEOUT)
    assert typer & 0x1F == NR_IRQS // 32 - 1                  # ITLinesNumber
    assert typer & GICD_TYPER_LPIS                             # an in-kernel ITS: LPIs
    assert ctlr & (GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1) == GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1
    assert rd_typer & (GICR_TYPER_PLPIS | GICR_TYPER_LAST) == GICR_TYPER_PLPIS | GICR_TYPER_LAST
    with m1.paused(TIMEOUT):                                   # the same registers as KVM sees them
        assert m1.gic.get_dist_reg(GICD_TYPER) == typer
        assert m1.gic.get_dist_reg(GICD_CTLR) == ctlr
        assert m1.gic.get_redist_reg64(m1.mpidrs[0], GICR_TYPER) == rd_typer

    agent.system_off(0)
    ex = m1.wait(TIMEOUT)
    assert (ex.reason, ex.status, ex.cpu) == ("poweroff", 0, 0)


def test_without_an_its_the_redistributor_has_no_lpis():
    m = boot(1, its=None)
    try:
        assert not m.agent.read(0, m.memmap.gicd.base + GICD_TYPER, 4, timeout=TIMEOUT) & GICD_TYPER_LPIS
        assert not m.agent.read(0, m.memmap.gicr_base(0) + GICR_TYPER, 8, timeout=TIMEOUT) & GICR_TYPER_PLPIS
    finally:
        m.close()


def test_every_vcpu_said_hello_with_its_mpidr(m4):
    assert sorted(m4.agent.online()) == [0, 1, 2, 3]
    for cpu in range(4):
        mpidr = m4.agent.read_sysreg(cpu, SysReg.MPIDR_EL1, timeout=TIMEOUT)
        assert mpidr == m4.agent.mpidr(cpu) == m4.mpidrs[cpu]
        assert mpidr & 0xFF_00FF_FFFF == kvm_default_mpidr(cpu)
        # another CPU_ON of a running CPU is refused by PSCI
    assert m4.agent.cpu_on(0, kvm_default_mpidr(1), timeout=TIMEOUT) == -4      # ALREADY_ON


def test_each_vcpu_reads_its_own_redistributor(m4):
    for cpu in range(4):
        rd = m4.memmap.gicr_base(cpu)
        typer = m4.agent.read(cpu, rd + GICR_TYPER, 8, timeout=TIMEOUT)
        assert (typer >> 8) & 0xFFFF == cpu                               # Processor_Number
        assert typer >> 32 == kvm_default_mpidr(cpu)                      # Affinity_Value (Aff2.Aff1.Aff0)
        assert bool(typer & GICR_TYPER_LAST) == (cpu == 3)
        # the agent enabled the timer PPI in its own SGI frame only
        assert m4.agent.read(cpu, rd + GICR_ISENABLER0, 4, timeout=TIMEOUT) & (1 << TIMER_PPI)


def test_cpu_interface_state_matches_kvms_view(m4):
    agent = m4.agent
    seen = {}
    for cpu in range(4):
        assert agent.read_sysreg(cpu, SysReg.ICC_SRE_EL1, timeout=TIMEOUT) & 1
        seen[cpu] = (agent.read_sysreg(cpu, SysReg.ICC_PMR_EL1, timeout=TIMEOUT),
                     agent.read_sysreg(cpu, SysReg.ICC_IGRPEN1_EL1, timeout=TIMEOUT))
        assert seen[cpu][0] & 0xF8 == 0xF8 and seen[cpu][1] == 1            # PMR 0xff (5+ priority bits)
        assert (agent.read_sysreg(cpu, SysReg.ID_AA64PFR0_EL1, timeout=TIMEOUT) >> 24) & 0xF == 1   # GIC sysregs
    with m4.paused(TIMEOUT):
        for cpu in range(4):
            assert (m4.gic.get_cpu_sysreg(m4.mpidrs[cpu], ICC_PMR_EL1),
                    m4.gic.get_cpu_sysreg(m4.mpidrs[cpu], ICC_IGRPEN1_EL1)) == seen[cpu]


def test_guest_stores_and_host_ram_agree(m4):
    ram = m4.ram
    base = m4.memmap.ram.base + m4.memmap.ram.size - 0x1000       # far above the agent and the DTB
    m4.agent.write(2, base, 8, 0x1122_3344_5566_7788, timeout=TIMEOUT)
    assert ram.read(base, 8) == bytes.fromhex("8877665544332211")
    ram.write(base + 8, bytes.fromhex("a1b2c3d4"))
    assert m4.agent.read(3, base + 8, 4, timeout=TIMEOUT) == 0xD4C3B2A1
    assert m4.agent.read(1, base + 9, 2, timeout=TIMEOUT) == 0xC3B2      # unaligned on Normal memory: fine
    m4.agent.write(0, base + 16, 1, 0x5A, timeout=TIMEOUT)
    assert ram.read(base + 16, 1) == b"\x5a"


def test_a_faulting_access_fails_the_request_not_the_agent(m4):
    # beyond the agent's 39-bit identity map: a stage 1 translation fault the agent takes itself
    # (an unaligned Device access would do on hardware, but TCG does not raise that one)
    with pytest.raises(AgentRequestFailed, match="FAULT") as e:
        m4.agent.read(1, 1 << 39, 4, timeout=TIMEOUT)
    assert e.value.code == ErrorCode.FAULT and (e.value.detail >> 26) & 0x3F == 0x25    # data abort, same EL
    assert e.value.detail & 0x3C == 0x04                                                # translation fault
    with pytest.raises(AgentRequestFailed, match="FAULT"):
        m4.agent.write(2, 1 << 39, 8, 1, timeout=TIMEOUT)
    assert m4.agent.ping(1, 77, timeout=TIMEOUT) == 77
    with pytest.raises(AgentRequestFailed, match="UNKNOWN_OP"):
        m4.agent.call(1, 200, timeout=TIMEOUT)
    with pytest.raises(AgentRequestFailed, match="BAD_ARG"):
        m4.agent.call(1, Op.SYSREG_WRITE, SysReg.MPIDR_EL1, 0, timeout=TIMEOUT)
    assert m4.agent.panics == []


def test_sgi_is_reported_by_the_target_vcpu(m4):
    agent = m4.agent
    agent.take_irqs()
    for target in (1, 2, 3):
        sgi_frame = m4.memmap.gicr_base(target)
        groups = agent.read(target, sgi_frame + GICR_IGROUPR0, 4, timeout=TIMEOUT)
        agent.write(target, sgi_frame + GICR_IGROUPR0, 4, groups | (1 << SGI), timeout=TIMEOUT)
        agent.write(target, sgi_frame + GICR_ISENABLER0, 4, 1 << SGI, timeout=TIMEOUT)
        # ICC_SGI1R_EL1: INTID [27:24], Aff1 [23:16] = 0, TargetList [15:0] (Aff0 bits)
        agent.write_sysreg(0, SysReg.ICC_SGI1R_EL1, (SGI << 24) | (1 << kvm_default_mpidr(target)),
                           timeout=TIMEOUT)
        got = agent.wait_irqs(1, TIMEOUT, intid=SGI)
        assert [(c, i) for c, i, _ in got] == [(target, SGI)]


def test_irq_mode_switch_and_back(m4):
    assert m4.agent.irq_mode(2, IrqMode.MASKED, timeout=TIMEOUT) == IrqMode.REPORT
    with pytest.raises(AgentRequestFailed, match="BAD_ARG"):
        m4.agent.irq_mode(2, IrqMode.COUNT, 0, 16, timeout=TIMEOUT)         # no table
    assert m4.agent.irq_mode(2, IrqMode.REPORT, timeout=TIMEOUT) == IrqMode.MASKED


def test_timed_read(m4):
    agent = m4.agent
    freq = agent.read_sysreg(0, SysReg.CNTFRQ_EL0, timeout=TIMEOUT)
    t0 = agent.read_sysreg(0, SysReg.CNTVCT_EL0, timeout=TIMEOUT)
    ram_ticks = agent.timed_read(0, m4.memmap.ram.base + 0x100000, 8, 1000, timeout=TIMEOUT)
    gicd_ticks = agent.timed_read(0, m4.memmap.gicd.base + GICD_TYPER, 4, 100, timeout=TIMEOUT)
    t1 = agent.read_sysreg(0, SysReg.CNTVCT_EL0, timeout=TIMEOUT)
    assert freq > 0 and t1 > t0
    assert 0 < ram_ticks < t1 - t0 and 0 < gicd_ticks < t1 - t0
    print(f"\nCNTFRQ {freq} Hz; 1000 RAM loads: {ram_ticks} ticks; 100 GICD_TYPER loads (in-kernel vGIC): "
          f"{gicd_ticks} ticks = {gicd_ticks / freq / 100 * 1e6:.2f} us each")


def test_system_off_from_a_secondary_ends_the_vm():
    m = boot(4)
    try:
        m.agent.system_off(3)
        ex = m.wait(TIMEOUT)
        assert (ex.reason, ex.status, ex.cpu) == ("poweroff", 0, 3)
        assert m.agent.panics == []
    finally:
        m.close()


def test_lpis_counted_in_guest_ram_without_exits_then_reported():
    """IRQ_MODE COUNT on vCPU 1: LPIs from KVM_SIGNAL_MSI through the in-kernel ITS (set up by the
    guest driver through the agent) are counted in guest RAM; an LPI past the counters, and every
    LPI once back in REPORT mode, is reported."""
    from kvmits.lab.guest_driver import GuestGic, GuestHeap, GuestIts

    m = boot(2)
    try:
        agent, ram = m.agent, m.ram
        heap = GuestHeap(ram, m.memmap.ram.base + (32 << 20), m.memmap.ram.base + (48 << 20))
        access = agent.client(0)
        GuestGic(access, ram, heap, m.memmap.gicr_base, 2).enable_lpis(enabled=True)
        its = GuestIts(access, ram, heap, m.memmap.its.base)
        its.setup()
        its.mapc(0, 1)                                  # collection 0 -> vCPU 1
        its.mapd(7, 2)
        its.mapti(7, 0, 8192, 0)
        its.mapti(7, 1, 8192 + 4, 0)                    # just past the 4 counters below
        table = heap.alloc(0x1000, 0x1000)
        assert agent.irq_mode(1, IrqMode.COUNT, table, 4, timeout=TIMEOUT) == IrqMode.REPORT
        agent.take_irqs()
        for n in range(1, 11):                          # one at a time: pending LPIs would merge
            assert m.signal_msi(7, 0) == 1
            deadline = time.monotonic() + TIMEOUT
            while ram.read_u32(table) != n:
                assert time.monotonic() < deadline, f"LPI 8192 count stuck at {ram.read_u32(table)}, want {n}"
                time.sleep(0.001)
        assert ram.read(table + 4, 12) == bytes(12)     # LPIs 8193..8195: never sent
        assert m.signal_msi(7, 1) == 1
        assert [(c, i) for c, i, _ in agent.wait_irqs(1, TIMEOUT, intid=8196)] == [(1, 8196)]
        assert agent.take_irqs() == []                  # the ten counted LPIs made no report

        assert agent.irq_mode(1, IrqMode.REPORT, timeout=TIMEOUT) == IrqMode.COUNT
        assert m.signal_msi(7, 0) == 1
        assert [(c, i) for c, i, _ in agent.wait_irqs(1, TIMEOUT, intid=8192)] == [(1, 8192)]
        assert ram.read_u32(table) == 10
        assert agent.panics == []
    finally:
        m.close()


def test_hello_prints_what_the_loader_handed_over_and_powers_off():
    """guests/hello: the smallest raw image. Its console line shows EL1, the boot vCPU's MPIDR and
    the device tree the loader put at x0; then PSCI SYSTEM_OFF ends the VM."""
    reason = _arm64_kvm_missing()
    if reason:
        pytest.skip(reason)
    import io

    from kvmits.machine import Machine, MachineConfig

    console = io.BytesIO()
    with Machine(MachineConfig(cpus=2, mem_size=64 << 20), console=console) as m:
        layout = m.load(guest_program("hello"))
        ex = m.run(TIMEOUT)
        assert (ex.reason, ex.status) == ("poweroff", 0)
        assert console.getvalue().decode() == (
            f"kvmits hello: running at EL1, MPIDR_EL1 {m.mpidrs[0]:#018x}, DTB at {layout.dtb_addr:#018x} "
            "(FDT magic ok)\r\npowering off\r\n")


def test_more_than_16_vcpus_use_aff1():
    """KVM's default MPIDR puts vCPU 16 at Aff1 = 1, Aff0 = 0: the agent's CPU index (and stack)
    must follow, or vCPUs 0 and 16 would share one."""
    m = boot(18)
    try:
        assert sorted(m.agent.online()) == list(range(18))
        for cpu in (0, 15, 16, 17):
            mpidr = m.agent.read_sysreg(cpu, SysReg.MPIDR_EL1, timeout=TIMEOUT)
            assert mpidr == m.mpidrs[cpu] and mpidr & 0xFF_00FF_FFFF == kvm_default_mpidr(cpu)
            typer = m.agent.read(cpu, m.memmap.gicr_base(cpu) + GICR_TYPER, 8, timeout=TIMEOUT)
            assert (typer >> 8) & 0xFFFF == cpu and typer >> 32 == kvm_default_mpidr(cpu)
        assert kvm_default_mpidr(16) == 0x100
        # all at once: each vCPU serves from its own stack
        reqs = [m.agent.post(cpu, Op.PING, 1000 + cpu) for cpu in range(18)]
        assert [r.wait(TIMEOUT) for r in reqs] == [1000 + cpu for cpu in range(18)]
        assert m.agent.panics == []
    finally:
        m.close()
