"""Where a pending LPI is delivered after the commands that move it, asked of the real kernel.

Each case runs with every vCPU's interrupts masked (the agent's IrqMode.MASKED: PSTATE.I set), so
an LPI made pending by INT stays pending while the commands run. Then each vCPU reads its
ICC_HPPIR1_EL1 (the highest-priority pending interrupt of its CPU interface, without taking it),
and finally every vCPU unmasks and the LPI is taken where it is pending. The answers are the
kernel's: with its="kernel" they are KVM's own ITS; with its="user" the model drives the hidden
ITS, and must land in the same place.

Why: issue 16. The model and the property test's reference disagreed on a MAPC re-target of a
collection holding a pending LPI; the kernel decides.
"""

from __future__ import annotations

import os

import pytest

from kvmits.its.registers import LPI_BASE
from kvmits.machine.agent import IrqMode, SysReg
from tests.arm64.conftest import LAB_CPUS

pytestmark = pytest.mark.arm64

CPUS = LAB_CPUS              # the shared `lab` fixture's (tests/arm64/conftest.py)
DEVID = 0x61


def pending_where(lab, intid: int) -> list[int]:
    """The vCPUs whose CPU interface has `intid` as its highest-priority pending interrupt."""
    return [cpu for cpu in range(CPUS)
            if lab.agent.read_sysreg(cpu, SysReg.ICC_HPPIR1_EL1) & 0xFFFFFF == intid]


def masked_then_delivered(lab, intid: int, commands) -> tuple[list[int], list[int]]:
    """Mask every vCPU, run `commands(lab)`, and return (where HPPIR shows `intid` pending, the
    vCPUs that took it once unmasked)."""
    lab.reset_its()
    lab.agent.take_irqs()
    for cpu in range(CPUS):
        lab.agent.irq_mode(cpu, IrqMode.MASKED)
    try:
        commands(lab)
        pending = pending_where(lab, intid)
    finally:
        for cpu in range(CPUS):
            lab.agent.irq_mode(cpu, IrqMode.REPORT)
    got = lab.agent.wait_irqs(1, 10.0, intid=intid)
    lab.expect_none(0.3)
    return pending, [cpu for cpu, _, _ in got]


def retarget_after_int(lab):
    """The shrunk property-test case: MAPTI on collection 0 (vCPU 0), INT, MOVALL 0 -> 0,
    then MAPC collection 0 -> vCPU 1."""
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE, 0)
    lab.its.int_(DEVID, 0)
    lab.its.movall(0, 0)
    lab.its.mapc(0, 1)


def retarget_only(lab):
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 1, 2)
    lab.its.int_(DEVID, 0)
    lab.its.mapc(2, 3)


def movall_of_a_pending_lpi(lab):
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 2, 1)
    lab.its.int_(DEVID, 0)
    lab.its.movall(1, 2)


def movi_of_a_pending_lpi(lab):
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 3, 0)
    lab.its.int_(DEVID, 0)
    lab.its.movi(DEVID, 0, 3)


def movall_then_mapc_to_the_same_target(lab):
    """MOVALL moves the pending LPI, not its ITE; a MAPC of the ITE's collection to the target
    it already has re-applies that target (KVM's update_affinity_collection): back it goes."""
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 4, 1)
    lab.its.int_(DEVID, 0)
    lab.its.movall(1, 2)
    lab.its.mapc(1, 1)


def discard_of_a_pending_lpi(lab):
    """DISCARD frees the ITE; KVM leaves the LPI pending (ItsConfig.discard_clears_pending)."""
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 5, 2)
    lab.its.int_(DEVID, 0)
    lab.its.discard(DEVID, 0)


def int_after_movall(lab):
    """INT makes the LPI pending where KVM has it (MOVALL moved it), not where its ITE says."""
    lab.its.mapd(DEVID, 1)
    lab.its.mapti(DEVID, 0, LPI_BASE + 6, 2)
    lab.its.movall(2, 0)
    lab.its.int_(DEVID, 0)


CASES = [
    # (name, commands, the LPI, where the model says it is pending)
    ("mapc_retarget_after_movall", retarget_after_int, LPI_BASE, 1),
    ("mapc_retarget", retarget_only, LPI_BASE + 1, 3),
    ("movall", movall_of_a_pending_lpi, LPI_BASE + 2, 2),
    ("movi", movi_of_a_pending_lpi, LPI_BASE + 3, 3),
    ("movall_then_mapc_same_target", movall_then_mapc_to_the_same_target, LPI_BASE + 4, 1),
    ("discard", discard_of_a_pending_lpi, LPI_BASE + 5, 2),
    ("int_after_movall", int_after_movall, LPI_BASE + 6, 0),
]


@pytest.mark.parametrize("name, commands, intid, model_cpu", CASES, ids=[c[0] for c in CASES])
def test_a_pending_lpi_is_delivered_where_the_kernel_moved_it(lab, name, commands, intid, model_cpu):
    pending, took = masked_then_delivered(lab, intid, commands)
    print(f"\n{os.uname().release}, its={lab.mode}, {name}: pending on vCPU(s) {pending} (ICC_HPPIR1_EL1), "
          f"taken on {took}; expected {model_cpu}")
    assert took == [model_cpu]
    assert pending == [model_cpu]


def test_an_lpi_made_without_a_target_latches_but_goes_nowhere(lab):
    """KVM makes an LPI's interrupt with its first ITE; on a collection without a target the
    interrupt has none (vgic_add_lpi with no vCPU). An INT through a second ITE, on a mapped
    collection, latches it but queues it on no vCPU; a MAPC giving the first collection a target
    moves it there without queueing it (update_affinity); an INV re-reads its configuration and
    queues it (update_lpi_config). Both ITSes must show the same at each step."""
    intid = LPI_BASE + 7
    lab.reset_its()
    lab.agent.take_irqs()
    for cpu in range(CPUS):
        lab.agent.irq_mode(cpu, IrqMode.MASKED)
    try:
        lab.its.mapd(DEVID, 1)
        lab.its.mapti(DEVID, 0, intid, 7)        # collection 7: never mapped so far
        lab.its.mapti(DEVID, 1, intid, 1)
        lab.its.int_(DEVID, 1)
        after_int = pending_where(lab, intid)
        lab.its.mapc(7, 2)
        after_mapc = pending_where(lab, intid)
        lab.its.inv(DEVID, 1)
        after_inv = pending_where(lab, intid)
    finally:
        for cpu in range(CPUS):
            lab.agent.irq_mode(cpu, IrqMode.REPORT)
    got = [cpu for cpu, i, _ in lab.agent.wait_irqs(1, 10.0, intid=intid)]
    lab.expect_none(0.3)
    print(f"\n{os.uname().release}, its={lab.mode}: pending after INT {after_int}, after MAPC "
          f"{after_mapc}, after INV {after_inv}; taken on {got}")
    assert (after_int, after_mapc, after_inv, got) == ([], [], [2], [2])


@pytest.mark.parametrize("target", [0, 2], ids=["on_the_submitting_vcpu", "on_another_vcpu"])
def test_clear_of_a_pending_lpi_while_the_other_vcpus_are_held(lab, target):
    """INT then CLEAR with the guest masked: the LPI is no longer pending. The guest's commands
    run on vCPU 0; the other vCPUs are held out of KVM_RUN meanwhile (ItsLab.holding), as the
    userspace ITS holds every vCPU for its commands. Without the hold, the kernel's ITS loses
    the CLEAR now and then (docs/userspace-its.md: an LPI in a running vCPU's list register
    keeps its pending bit when KVM folds the register back)."""
    intid = LPI_BASE + 8
    lost = 0
    for _ in range(5):
        lab.reset_its()
        lab.agent.take_irqs()
        lab.mask()
        try:
            with lab.holding():
                lab.its.mapd(DEVID, 1)
                lab.its.mapti(DEVID, 0, intid, target)
                lab.its.int_(DEVID, 0)
                lab.its.clear(DEVID, 0)
        finally:
            taken = lab.unmask()
        lost += (target, intid) in taken
    assert lost == 0
