"""Fake vCPUs for the thread/pause logic of kvmits.machine.runner, without KVM.

A FakeVcpu plays a script of exits, then idles like a vCPU in WFI until it is kicked (the
runner's signal, redirected by the `kicks` fixture of conftest.py) or entered with immediate_exit set.
"""

from __future__ import annotations

import itertools
import threading

from kvmits.kvm import MmioExit, Vcpu


def mmio(gpa, size=4, write=False, data=0):
    ex = MmioExit()
    ex.phys_addr, ex.size, ex.is_write, ex.data = gpa, size, int(write), data
    return ex


def mmio_forever(gpa, size=4):
    """An endless stream of MMIO reads (a guest polling a register)."""
    return (mmio(gpa, size) for _ in itertools.count())


class FakeVcpu:
    EXIT_INTR = Vcpu.EXIT_INTR

    def __init__(self, script=()):
        self._ie = 0
        self._script = iter(script)
        self.kicked = threading.Event()
        self.inside = False             # inside run(), i.e. "in KVM_RUN"
        self.entries = 0
        self.completed_reads = []

    @property
    def immediate_exit(self):
        return self._ie

    @immediate_exit.setter
    def immediate_exit(self, value):
        self._ie = 1 if value else 0

    def run(self):
        self.inside = True
        self.entries += 1
        try:
            if self._ie:
                return Vcpu.INTR
            item = next(self._script, None)
            if item is not None:
                return item
            while not self.kicked.is_set() and not self._ie:
                self.kicked.wait(0.001)
            self.kicked.clear()
            return Vcpu.INTR
        finally:
            self.inside = False

    def complete_mmio_read(self, value):
        self.completed_reads.append(value)
