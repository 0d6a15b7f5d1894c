"""A guest ITS driver against both ITSes, end to end on real arm64 KVM: the kernel's, and
kvmits' userspace model in front of a hidden in-kernel ITS; the same tests, the same guest.

The guest (the agent, driven by kvmits.lab.guest_driver) sets up LPIs and the ITS, maps a
device, one collection per vCPU and events to LPIs; the host injects MSIs by KVM_SIGNAL_MSI and
by irqfd, and each LPI must reach the guest on the vCPU its collection names. Then the commands
that change delivery: INT, INV/INVALL, MOVI, MOVALL, DISCARD, MAPD V=0, CLEAR.

One VM (4 vCPUs) serves the whole module, each test on a DeviceID and LPIs of its own: the
testbed's nested, emulated arm64 is slow to boot. Natively on arm64 KVM, or on x86_64 with
    tools/testbed run -- python3 -m pytest tests/arm64/test_its_guest.py -v
"""

from __future__ import annotations

import pytest

from kvmits.its.registers import GITS_BASER_TYPE_COLLECTION as BASER_TYPE_COLLECTION
from kvmits.its.registers import GITS_BASER_TYPE_DEVICE as BASER_TYPE_DEVICE
from kvmits.its.registers import LPI_BASE
from tests.arm64.conftest import LAB_CPUS

pytestmark = pytest.mark.arm64

CPUS = LAB_CPUS              # the shared `lab` fixture's (tests/arm64/conftest.py)
LPI = LPI_BASE


@pytest.fixture(autouse=True)
def quiet_between_tests(lab):
    lab.agent.take_irqs()
    yield
    lab.agent.check()


def map_events(lab, devid: int, events: dict[int, tuple[int, int]], event_bits: int = 4) -> None:
    """MAPD `devid`, then MAPTI eventid -> (intid, icid) for each of `events`."""
    lab.its.mapd(devid, event_bits)
    for ev, (intid, icid) in events.items():
        lab.its.mapti(devid, ev, intid, icid)


def test_gits_registers_as_the_guest_reads_them(lab):
    ident = lab.its.identify()
    iidr, typer = ident["GITS_IIDR"], ident["GITS_TYPER"]
    assert iidr & 0xFFF == 0x43B and iidr >> 24 == 0x4B           # implementer Arm, KVM's product ID
    assert typer & 1                                              # Physical LPIs
    assert ((typer >> 4) & 0xF) + 1 == 8                          # ITT entry size
    assert ((typer >> 8) & 0x1F) + 1 == 16                        # IDbits
    assert ((typer >> 13) & 0x1F) + 1 == 16                       # Devbits
    assert not typer & (1 << 19)                                  # PTA = 0: RDbase is a vCPU number
    types = [b["type"] for b in ident["baser"]]
    assert types == [BASER_TYPE_DEVICE, BASER_TYPE_COLLECTION, 0, 0, 0, 0, 0, 0]
    for b in ident["baser"][:2]:
        assert b["entry_size"] == 8 and b["page_size"] == 0x10000
    assert ident["GITS_CTLR"] & 1                                 # enabled by lab.setup()


def test_msi_reaches_the_vcpu_of_its_collection(lab):
    devid = 0x10
    map_events(lab, devid, {ev: (LPI + 16 + ev, ev % CPUS) for ev in range(8)})
    for ev in range(8):
        assert lab.msi(devid, ev) == 1
        lab.expect(cpu=ev % CPUS, intid=LPI + 16 + ev)


def test_irqfd_msi_reaches_the_guest(lab):
    devid = 0x11
    map_events(lab, devid, {ev: (LPI + 32 + ev, ev) for ev in range(CPUS)})
    efds = lab.routes({(devid, ev): 10 + ev for ev in range(CPUS)})
    for ev in reversed(range(CPUS)):
        efds[(devid, ev)].write(1)
        lab.expect(cpu=ev, intid=LPI + 32 + ev)


def test_int_command(lab):
    devid = 0x12
    map_events(lab, devid, {0: (LPI + 48, 3)})
    lab.its.int_(devid, 0)
    lab.expect(cpu=3, intid=LPI + 48)


@pytest.mark.parametrize("invalidate", ["INV", "INVALL"])
def test_property_change_needs_inv(lab, invalidate):
    devid, intid, cpu = (0x13, LPI + 64, 1) if invalidate == "INV" else (0x14, LPI + 65, 2)
    map_events(lab, devid, {0: (intid, cpu)})

    def apply():
        if invalidate == "INV":
            lab.its.inv(devid, 0)
        else:
            lab.its.invall(cpu)

    lab.gic.set_lpi_config(intid, enabled=False)
    apply()
    assert lab.msi(devid, 0) == 1          # translated and made pending, but disabled
    lab.expect_none()
    lab.gic.set_lpi_config(intid, enabled=True)
    apply()
    lab.expect(cpu=cpu, intid=intid)       # the pending LPI arrives once enabled


def test_movi_moves_the_lpi(lab):
    devid, intid = 0x15, LPI + 80
    map_events(lab, devid, {0: (intid, 0)})
    lab.msi(devid, 0)
    lab.expect(cpu=0, intid=intid)
    lab.its.movi(devid, 0, 3)
    lab.msi(devid, 0)
    lab.expect(cpu=3, intid=intid)


def test_movall_moves_pending_lpis(lab):
    """Retarget collection 1 to vCPU 2 (MAPC) and move vCPU 1's pending LPIs there (MOVALL)."""
    devid, intid = 0x16, LPI + 96
    map_events(lab, devid, {0: (intid, 1)})
    lab.gic.set_lpi_config(intid, enabled=False)
    lab.its.inv(devid, 0)
    lab.msi(devid, 0)                      # pending on vCPU 1, not taken
    lab.its.mapc(1, 2)
    lab.its.movall(1, 2)
    lab.gic.set_lpi_config(intid, enabled=True)
    lab.its.inv(devid, 0)
    lab.expect(cpu=2, intid=intid)
    lab.msi(devid, 0)
    lab.expect(cpu=2, intid=intid)
    lab.its.mapc(1, 1)                     # put collection 1 back for the other tests
    lab.msi(devid, 0)
    lab.expect(cpu=1, intid=intid)


def test_discard_stops_delivery(lab):
    devid, intid = 0x17, LPI + 112
    map_events(lab, devid, {0: (intid, 2), 1: (intid + 1, 2)})
    lab.its.discard(devid, 0)
    assert lab.msi(devid, 0) == 0          # no ITE: does not translate
    lab.expect_none()
    assert lab.msi(devid, 1) == 1          # the other event is untouched
    lab.expect(cpu=2, intid=intid + 1)


def test_mapd_invalid_unmaps_the_device(lab):
    devid, intid = 0x18, LPI + 128
    map_events(lab, devid, {0: (intid, 0)})
    assert lab.msi(devid, 0) == 1
    lab.expect(cpu=0, intid=intid)
    lab.its.mapd(devid, 4, valid=False)
    assert lab.msi(devid, 0) == 0
    lab.expect_none()


def test_clear_removes_the_pending_state(lab):
    devid, intid = 0x19, LPI + 144
    map_events(lab, devid, {0: (intid, 3)})
    lab.gic.set_lpi_config(intid, enabled=False)
    lab.its.inv(devid, 0)
    lab.msi(devid, 0)                      # pending while disabled
    lab.its.clear(devid, 0)
    lab.gic.set_lpi_config(intid, enabled=True)
    lab.its.inv(devid, 0)
    lab.expect_none()                      # nothing was left pending
    lab.msi(devid, 0)
    lab.expect(cpu=3, intid=intid)


def test_userspace_its_paths(lab):
    """In --its user mode: commands stop the vCPUs once per GITS_CWRITER write and run on the
    hidden ITS; signal_msi goes through the model; a translating irqfd never wakes Python, one
    that does not translate is served (and dropped, counted) by the Python slow path."""
    user = lab.machine.its
    if user.kind != "user":
        pytest.skip("kernel ITS: nothing of kvmits' in the delivery path")
    devid, intid = 0x1A, LPI + 160
    stops, kicks = user.stops, user.hidden.kicks
    map_events(lab, devid, {0: (intid, 1)}, event_bits=1)
    assert user.stops - stops == 2        # MAPD, MAPTI: one stop per GITS_CWRITER write
    assert user.hidden.kicks - kicks == 1       # only MAPTI changed what the hidden ITS must do
    assert user.hidden.mapping()[intid] == 1

    msis, injected = user.model.msis, user.hidden.injected
    assert lab.msi(devid, 0) == 1
    lab.expect(cpu=1, intid=intid)
    assert (user.model.msis - msis, user.hidden.injected - injected) == (1, 1)

    efds = lab.routes({(devid, 0): 20, (devid, 1): 21})         # event 1 has no ITE
    assert user.routes.compiles >= 1
    msis, slow = user.model.msis, user.routes.slow_path_msis
    efds[(devid, 0)].write(1)
    lab.expect(cpu=1, intid=intid)
    assert user.model.msis == msis and user.routes.slow_path_msis == slow   # KVM alone delivered it
    misses = sum(user.model.miss_counts)
    efds[(devid, 1)].write(1)
    lab.expect_none()
    assert user.routes.slow_path_msis == slow + 1 and sum(user.model.miss_counts) == misses + 1

    lab.its.mapti(devid, 1, intid + 1, 3)                        # now it translates: recompiled
    efds[(devid, 1)].write(1)
    lab.expect(cpu=3, intid=intid + 1)
    assert user.routes.slow_path_msis == slow + 1


def test_guest_cannot_reach_the_hidden_its(lab):
    """The hidden ITS and its memory are the VMM's: a guest writing over the hidden ITS's frame
    (covered by a RAM slot) and over its private memory (a read-only slot) changes nothing the
    VMM relies on."""
    user = lab.machine.its
    if user.kind != "user":
        pytest.skip("kernel ITS: there is no hidden ITS")
    from kvmits.its.registers import GITS_CBASER, GITS_CTLR, GITS_CWRITER, GITS_TRANSLATER
    from kvmits.machine.its.hidden import CQ_OFFSET, ITT_OFFSET
    from kvmits.machine.memmap import HIDDEN_ITS_BASE
    from kvmits.machine.memmap import HIDDEN_ITS_PRIVATE_BASE as PRIVATE_BASE

    devid, intid = 0x1B, LPI + 176
    map_events(lab, devid, {0: (intid, 2)})
    private_before = user.hidden.private.read(user.hidden.private.gpa, user.hidden.private.size)
    a = lab.agent
    # What disabled the uncovered hidden ITS on the testbed: GITS_CTLR = 0, from the guest.
    a.write(0, HIDDEN_ITS_BASE + GITS_CTLR, 4, 0)
    a.write(0, HIDDEN_ITS_BASE + GITS_CBASER, 8, 0)
    a.write(0, HIDDEN_ITS_BASE + GITS_CWRITER, 8, 0x7FE0)
    a.write(0, HIDDEN_ITS_BASE + GITS_TRANSLATER, 4, intid - LPI)
    assert a.read(0, HIDDEN_ITS_BASE + GITS_CWRITER, 8) == 0x7FE0     # plain RAM answers
    for off in (0, 0x10000, CQ_OFFSET, CQ_OFFSET + 0x20, ITT_OFFSET, ITT_OFFSET + 8 * (intid - LPI)):
        a.write(0, PRIVATE_BASE + off, 8, 0xDEAD_BEEF_DEAD_BEEF)
    assert user.hidden.private.read(user.hidden.private.gpa, user.hidden.private.size) == private_before
    lab.expect_none()                                    # the TRANSLATER write went nowhere
    with lab.machine.paused():
        assert user.hidden.kernel_its.get_reg(GITS_CTLR) & 1      # still enabled
    assert lab.msi(devid, 0) == 1
    lab.expect(cpu=2, intid=intid)
    lab.its.movi(devid, 0, 0)                            # commands still reach it
    assert lab.msi(devid, 0) == 1
    lab.expect(cpu=0, intid=intid)


def test_experimental_lpi_injection_by_number(lab):
    """KVM_IRQ_LINE with an LPI number (undocumented): accepted once an in-kernel ITS maps the
    LPI (the kernel's, or the hidden one behind the userspace ITS), refused before and after."""
    devid, intid = 0x1C, LPI + 192
    assert not lab.machine.lpi_injection_works(intid)      # nothing maps it yet: EINVAL
    map_events(lab, devid, {0: (intid, 3)})
    assert lab.machine.lpi_injection_works(intid)
    lab.expect_none()                                      # the probe itself injects nothing
    lab.machine.inject_lpi(intid)
    lab.expect(cpu=3, intid=intid)
    lab.its.movi(devid, 0, 1)                              # it follows MOVI
    lab.machine.inject_lpi(intid)
    lab.expect(cpu=1, intid=intid)
    lab.its.discard(devid, 0)
    assert not lab.machine.lpi_injection_works(intid)
    with pytest.raises(ValueError):
        lab.machine.inject_lpi(8191)
