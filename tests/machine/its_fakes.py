"""A stand-in machine for what reads a machine's ITS (MachineIts, the control socket, `kvmits
its --connect`) without arm64 KVM: the userspace ITS's model as is, or the model standing in
for the kernel's ITS behind the attribute calls KernelMachineIts makes."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

from kvmits.errors import KvmError
from kvmits.its import commands as C
from kvmits.machine.its import KernelMachineIts, UserMachineIts
from kvmits.machine.memmap import ITS_BASE
from tests.its.ramfake import Harness, itt


def mapped_harness() -> Harness:
    """3 vCPUs; device 4: event 1 -> LPI 8192 on vCPU 1, event 2 orphaned (collection 1 unmapped)."""
    h = Harness(nr_vcpus=3)
    h.run(C.encode_mapc(0, 1), C.encode_mapc(1, 2), C.encode_mapd(4, itt(4), 2),
          C.encode_mapti(4, 1, 8192, 0), C.encode_mapti(4, 2, 8193, 1), C.encode_mapc(1, 0, valid=False))
    return h


class FakeKernelIts:
    """The model behind the KVM attribute calls KernelMachineIts makes; every call checks the vCPUs
    are paused, as KVM does (EBUSY otherwise)."""

    base = ITS_BASE

    def __init__(self, model, paused):
        self.model, self.paused = model, paused
        self.saves = 0

    def _check(self, name):
        if not self.paused.is_set():
            raise KvmError(name, 16)

    def save_tables(self):
        self._check("KVM_SET_DEVICE_ATTR")
        self.saves += 1
        self.model.save_tables()

    def get_reg(self, offset):
        self._check("KVM_GET_DEVICE_ATTR")
        return self.model.mmio_read(offset, 8 if offset else 4)


def fake_machine(h: Harness, kind: str):
    """A machine whose ITS is `kind` ("kernel", "user" or "none") over the harness's model: the
    real MachineIts implementations, over stand-ins for KVM."""
    paused = threading.Event()

    @contextlib.contextmanager
    def pause():
        paused.set()
        try:
            yield
        finally:
            paused.clear()

    m = SimpleNamespace(config=SimpleNamespace(cpus=3), ram=h.ram, paused=pause, its=None)
    if kind == "user":
        # the hidden ITS's LPI -> vCPU: here simply each live ITE's target
        hidden = SimpleNamespace(mapping=lambda: {i: t for _, _, i, _, t in h.its.live_mappings()},
                                 kicks=0, commands=0, injected=0, dropped=0)
        m.its = UserMachineIts(h.its, hidden, pause, lpi_limit=None, base=ITS_BASE, ram=h.ram, nr_vcpus=3)
    elif kind == "kernel":
        m.its = KernelMachineIts(SimpleNamespace(fd=-1), FakeKernelIts(h.its, paused), h.ram, 3, pause)
    return m
