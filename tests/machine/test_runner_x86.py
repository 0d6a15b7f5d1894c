"""The vCPU threads against the host's real KVM (x86_64): KVM_RUN, the kick signal,
immediate_exit and pause/resume on a tiny real-mode guest (kvmits/bench/x86guest.py)."""

from __future__ import annotations

import time

import pytest

from kvmits import uapi
from kvmits.machine.bus import MmioBus
from kvmits.machine.runner import MachineExit, VcpuRunner, install_kick_handler
from kvmits.bench import x86guest

pytestmark = pytest.mark.kvm
TIMEOUT = 20
SPIN = b"\xeb\xfe"           # jmp $


class Counter:
    """The guest's MMIO window: counts reads (answering the count) and remembers the last write."""

    def __init__(self, on_write=None):
        self.reads = 0
        self.last = None
        self.on_write = on_write

    def mmio_read(self, vcpu, offset, size):
        self.reads += 1
        return self.reads & 0xFFFF

    def mmio_write(self, vcpu, offset, size, value):
        self.last = (vcpu, offset, value)
        if self.on_write:
            self.on_write(vcpu)


def second_vcpu(vm, index):
    return x86guest.real_mode_vcpu(vm, index)


def wait_for(pred, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


@pytest.fixture
def loop_vm(x86_kvm):
    install_kick_handler()
    with x86_kvm.create_vm() as vm:
        v0, ram = x86guest.boot(vm, x86guest.LOOP)
        v1 = second_vcpu(vm, 1)
        yield vm, [v0, v1]
        ram.close()


def make(vcpus, device, **kw):
    bus = MmioBus()
    bus.add(x86guest.MMIO, 0x1000, device)
    return VcpuRunner(vcpus, bus, **kw)


def test_pause_resume_with_real_kvm_run(loop_vm):
    _vm, vcpus = loop_vm
    dev = Counter()
    runner = make(vcpus, dev)
    runner.start()
    try:
        wait_for(lambda: dev.reads > 1000)
        for _ in range(20):
            runner.pause_all(TIMEOUT)
            # out of KVM_RUN now; an exit still being handled finishes, then its thread parks
            wait_for(lambda: runner.states() == ["PARKED", "PARKED"])
            before = dev.reads
            time.sleep(0.01)
            assert dev.reads == before
            assert runner.states() == ["PARKED", "PARKED"]
            runner.resume_all()
            wait_for(lambda before=before: dev.reads > before + 100)
        # (whether a pause found a vCPU inside KVM_RUN is up to the scheduler and the GIL: the
        # EINTR path is checked with a guest that never exits, below)
    finally:
        runner.stop()
    assert runner.wait(TIMEOUT).reason == "stopped"


@pytest.mark.parametrize("how", ["kick", "pause"])
def test_a_spinning_vcpu_leaves_kvm_run(x86_kvm, how):
    """A guest spinning in `jmp $` never exits by itself, so it is always inside KVM_RUN: each
    kick, and each pause, is one EINTR."""
    install_kick_handler()
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, SPIN)
        runner = make([vcpu], Counter())
        runner.start()
        try:
            for n in range(1, 6):
                time.sleep(0.01)                  # let it get back into KVM_RUN
                if how == "kick":
                    runner.kick(0)
                    wait_for(lambda n=n: runner.interrupts[0] >= n)
                else:
                    runner.pause_all(TIMEOUT)
                    wait_for(lambda: runner.states() == ["PARKED"])
                    runner.resume_all()
                assert runner.interrupts[0] == n
            assert runner.running
        finally:
            runner.stop()
            runner.wait(TIMEOUT)
        ram.close()


def test_pause_from_the_exit_path(loop_vm):
    """vCPU 0's device model pauses the VM on every 200th write; vCPU 1 keeps exiting too."""
    _vm, vcpus = loop_vm
    runner = None
    pauses = []

    def on_write(vcpu):
        if vcpu == 0 and dev.reads % 200 == 0:
            runner.pause_all(TIMEOUT)
            pauses.append(runner.states())
            runner.resume_all()

    dev = Counter(on_write)
    runner = make(vcpus, dev)
    runner.start()
    try:
        wait_for(lambda: len(pauses) >= 10)
    finally:
        runner.stop()
    runner.wait(TIMEOUT)
    for states in pauses:
        assert states[1] in ("PARKED", "OUTSIDE", "EXITED")   # EXITED: after stop()


def test_hlt_ends_the_vm_through_an_exit_handler(x86_kvm):
    install_kick_handler()
    with x86_kvm.create_vm() as vm:
        vcpu, ram = x86guest.boot(vm, x86guest.ROUND_TRIP)
        dev = Counter()
        runner = make([vcpu], dev, exit_handlers={uapi.KVM_EXIT_HLT: lambda cpu, ex: MachineExit("halted", 0, cpu)})
        runner.start()
        assert runner.wait(TIMEOUT) == MachineExit("halted", 0, 0)
        assert dev.last == (0, 4, 2)                  # the guest wrote back our answer (1) + 1
        ram.close()
