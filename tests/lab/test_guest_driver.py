"""The through-the-guest GIC/ITS driver against the userspace ITS model, on the host.

The "guest" here is a fake GuestAccess that routes each load/store to the device it hits: the
ITS frame goes to kvmits.its.ItsModel, the redistributors to a small register file. It checks the
driver programs an ITS the way the architecture wants, in milliseconds; the same driver runs
through the real guest agent against both real ITSes in tests/arm64.
"""

from __future__ import annotations

import pytest

from kvmits.gic import regs
from kvmits.its import registers as R
from kvmits.its import ItsModel, RecordingSink, Redistributors
from kvmits.kvm import GuestMemory
from kvmits.lab.guest_driver import DriverError, GuestGic, GuestHeap, GuestIts

RAM = 0x40000000
ITS = 0x08080000
GICR = 0x080A0000
CPUS = 4


class FakeGuest:
    """Loads and stores of a guest vCPU, dispatched by address; records every access."""

    def __init__(self, its: ItsModel, lpis: bool = True):
        self.its = its
        self.gicr = {}          # (cpu, offset) -> value
        self.lpis = lpis
        self.accesses = []

    def _gicr(self, addr):
        cpu, off = divmod(addr - GICR, regs.GICR_STRIDE)
        return cpu, off

    def read(self, addr, width):
        self.accesses.append(("r", addr, width))
        if ITS <= addr < ITS + R.ITS_FRAME_SIZE:
            return self.its.mmio_read(addr - ITS, width)
        cpu, off = self._gicr(addr)
        if off == regs.GICR_TYPER:
            return (1 if self.lpis else 0) | (cpu << 8)
        return self.gicr.get((cpu, off), 0)

    def write(self, addr, width, value):
        self.accesses.append(("w", addr, width, value))
        if ITS <= addr < ITS + R.ITS_FRAME_SIZE:
            return self.its.mmio_write(addr - ITS, width, value)
        cpu, off = self._gicr(addr)
        if off == regs.GICR_CTLR and not self.lpis:
            return
        self.gicr[(cpu, off)] = value


@pytest.fixture
def setup():
    ram = GuestMemory(RAM, 32 << 20)
    sink = RecordingSink()
    gic_limit = {"bits": 16}
    model = ItsModel(ram, sink, Redistributors(CPUS, lambda: 1 << gic_limit["bits"]))
    guest = FakeGuest(model)
    heap = GuestHeap(ram, RAM + (4 << 20), RAM + (32 << 20))
    gic = GuestGic(guest, ram, heap, lambda c: GICR + c * regs.GICR_STRIDE, CPUS)
    its = GuestIts(guest, ram, heap, ITS)
    yield ram, sink, model, guest, gic, its
    ram.close()


def test_lpi_setup_programs_every_redistributor(setup):
    ram, _sink, _model, guest, gic, _its = setup
    gic.enable_lpis()
    for cpu in range(CPUS):
        prop = guest.gicr[(cpu, regs.GICR_PROPBASER)]
        pend = guest.gicr[(cpu, regs.GICR_PENDBASER)]
        assert prop & 0x1F == 15                                # IDbits = 16 - 1
        assert prop & 0xFFFFFFFFF000 == gic.prop_table          # one shared property table
        assert pend & 0xFFFFFFFF0000 == gic.pend_tables[cpu] and pend & (1 << 62)   # PTZ
        assert guest.gicr[(cpu, regs.GICR_CTLR)] & 1
    assert len(set(gic.pend_tables.values())) == CPUS
    gic.set_lpi_config(8200, enabled=True, priority=0x40)
    assert gic.lpi_config(8200) == 0x41


def test_no_lpi_support_is_a_clear_error(setup):
    _ram, _sink, _model, guest, gic, _its = setup
    guest.lpis = False
    with pytest.raises(DriverError, match="PLPIS"):
        gic.enable_lpis()


@pytest.mark.parametrize("two_level", [False, True])
def test_its_setup_and_mapping_reach_the_model(setup, two_level):
    _ram, sink, model, _guest, gic, its = setup
    ident = its.identify()
    assert ident["GITS_IIDR"] == 0x4B00043B and ident["GITS_TYPER"] == 0x1EF71
    assert [b["type"] for b in ident["baser"][:2]] == [R.GITS_BASER_TYPE_DEVICE, R.GITS_BASER_TYPE_COLLECTION]
    gic.enable_lpis(enabled=True)
    its.setup(two_level=two_level)
    assert model.enabled
    assert its.tables[R.GITS_BASER_TYPE_DEVICE].indirect is two_level
    for cpu in range(CPUS):
        its.mapc(cpu, cpu)
    its.mapd(0x1234, event_bits=4)
    for ev in range(4):
        its.mapti(0x1234, ev, 8192 + ev, ev % CPUS)
    t = model.translate(0x1234, 3)
    assert t.ok and (t.intid, t.target) == (8195, 3)
    assert model.dump()["collections"] == {c: c for c in range(CPUS)}
    its.int_(0x1234, 2)
    assert ("set_pending", 8194, 2) in sink.calls
    its.movi(0x1234, 2, 0)
    assert model.translate(0x1234, 2).target == 0
    its.discard(0x1234, 1)
    assert not model.translate(0x1234, 1).ok
    its.mapd(0x1234, 4, valid=False)
    assert not model.translate(0x1234, 0).ok
    assert model.error_counts == {}


def test_queue_wraps_around(setup):
    _ram, _sink, model, _guest, gic, its = setup
    gic.enable_lpis()
    its.queue_size = 0x1000
    its.setup()
    its.mapc(0, 0)
    its.mapd(7, 8)
    for ev in range(200):                    # 128 slots: wraps at least once
        its.mapti(7, ev, 8192 + ev, 0)
    assert its.cwriter < 0x1000 and model.creadr == its.cwriter
    assert model.translate(7, 199).intid == 8192 + 199


def test_command_errors_do_not_stall_by_default(setup):
    _ram, _sink, model, _guest, gic, its = setup
    gic.enable_lpis()
    its.setup()
    its.mapti(99, 0, 8192, 0)                # device 99 is not mapped: dropped, queue goes on
    assert sum(model.error_counts.values()) == 1
