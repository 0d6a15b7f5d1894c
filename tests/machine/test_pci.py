"""PCI configuration space and the ECAM host bridge, on the host (no KVM needed)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmits.machine.bus import MmioBus
from kvmits.machine.pci import Bar, ConfigSpace, PciHost
from kvmits.machine.pci import config as P

ECAM = 0x3F00_0000
MMIO = 0x1000_0000
MMIO_SIZE = 0x100_0000


class Function:
    """A function with a 32-bit 16 KiB BAR 0 and a 64-bit 64 KiB BAR 2, recording BAR accesses."""

    def __init__(self, device_id=0x1042):
        self.config = ConfigSpace(0x1AF4, device_id, 0x010000, revision=1,
                                  bars=(Bar(0, 0x4000), Bar(2, 0x10000, is_64bit=True, prefetchable=True)))
        self.accesses = []

    def bar_read(self, vcpu, bar, offset, size):
        self.accesses.append(("read", bar, offset, size))
        return 0x5A

    def bar_write(self, vcpu, bar, offset, size, value):
        self.accesses.append(("write", bar, offset, size, value))


def ecam(device, offset, fn=0, bus=0):
    return bus << 20 | device << 15 | fn << 12 | offset


@pytest.fixture
def rig():
    bus = MmioBus()
    host = PciHost(bus, MMIO, MMIO_SIZE)
    bus.add(ECAM, 1 << 20, host, "ecam")
    f = Function()
    devfn = host.add(3, f)
    return bus, host, f, devfn


def test_the_header_reads_as_the_device_says_and_ids_do_not_change():
    c = Function().config
    assert c.read(P.PCI_VENDOR_ID, 4) == 0x1042 << 16 | 0x1AF4
    assert c.read(P.PCI_REVISION_ID, 4) == 0x010000 << 8 | 1
    assert c.read(P.PCI_HEADER_TYPE, 1) == P.PCI_HEADER_TYPE_NORMAL
    c.write(P.PCI_VENDOR_ID, 4, 0xFFFF_FFFF)
    c.write(P.PCI_CLASS_PROG, 1, 0x77)
    assert c.read(P.PCI_VENDOR_ID, 4) == 0x1042 << 16 | 0x1AF4 and c.read(P.PCI_CLASS_PROG, 1) == 0
    c.write(P.PCI_COMMAND, 2, 0xFFFF)
    assert c.command == P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER | P.PCI_COMMAND_INTX_DISABLE


def test_bar_sizing_reads_back_the_size_mask_and_type():
    """PCI 3.0 6.2.5.1: write all ones, read the mask; the 64-bit BAR's upper half sizes too."""
    c = Function().config
    c.write(P.PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert c.read(P.PCI_BASE_ADDRESS_0, 4) == 0xFFFF_C000
    c.write(P.PCI_BASE_ADDRESS_0 + 8, 4, 0xFFFF_FFFF)
    c.write(P.PCI_BASE_ADDRESS_0 + 12, 4, 0xFFFF_FFFF)
    assert c.read(P.PCI_BASE_ADDRESS_0 + 8, 4) == 0xFFFF_0000 | P.PCI_BASE_ADDRESS_MEM_TYPE_64 | P.PCI_BASE_ADDRESS_MEM_PREFETCH
    assert c.read(P.PCI_BASE_ADDRESS_0 + 12, 4) == 0xFFFF_FFFF
    assert c.read(P.PCI_BASE_ADDRESS_0 + 4, 4) == 0          # BAR 1 not implemented: read-only zero
    c.write(P.PCI_BASE_ADDRESS_0 + 8, 4, 0x1234_5678)
    c.write(P.PCI_BASE_ADDRESS_0 + 12, 4, 0x9)
    assert c.bar_address(2) == 0x9_1234_0000


def test_capabilities_are_chained_aligned_and_announced():
    c = Function().config
    assert not c.read(P.PCI_STATUS, 2) & P.PCI_STATUS_CAP_LIST
    first = c.add_capability(P.PCI_CAP_ID_VNDR, bytes([14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]))
    second = c.add_capability(P.PCI_CAP_ID_MSIX, bytes(10), wmask=bytes([0, 0xC0] + [0] * 8))
    assert first == 0x40 and second == 0x50 and second % 4 == 0
    assert c.read(P.PCI_STATUS, 2) & P.PCI_STATUS_CAP_LIST
    assert c.capabilities() == [(0x40, P.PCI_CAP_ID_VNDR), (0x50, P.PCI_CAP_ID_MSIX)]
    c.write(second + 3, 1, 0xFF)                              # only the writable bits move
    assert c.read(second + 3, 1) == 0xC0
    c.write(P.PCI_CAPABILITY_LIST, 1, 0)                      # the chain is read-only
    assert c.capabilities()[0] == (0x40, P.PCI_CAP_ID_VNDR)
    with pytest.raises(ValueError, match="256"):
        for _ in range(20):
            c.add_capability(P.PCI_CAP_ID_VNDR, bytes(30))


def test_bad_bars_are_refused_at_construction():
    with pytest.raises(ValueError):
        Bar(0, 0x3000)                       # not a power of two
    with pytest.raises(ValueError):
        Bar(5, 0x1000, is_64bit=True)        # a 64-bit BAR needs two registers
    with pytest.raises(ValueError, match="overlaps"):
        ConfigSpace(1, 2, 3, bars=(Bar(0, 0x1000, is_64bit=True), Bar(1, 0x1000)))


def test_absent_functions_and_other_buses_read_all_ones(rig):
    bus, host, f, devfn = rig
    assert devfn == 3 << 3
    for size in (1, 2, 4, 8):
        assert bus.read(0, ECAM + ecam(4, 0), size) == (1 << (8 * size)) - 1
        assert host.mmio_read(0, ecam(3, 0, bus=1), size) == (1 << (8 * size)) - 1
    host.mmio_write(0, ecam(4, P.PCI_COMMAND), 2, 0xFFFF)   # dropped, no error
    assert host.mmio_read(0, ecam(3, 0), 8) == f.config.read(0, 4) | f.config.read(4, 4) << 32
    assert host.mmio_read(0, ecam(3, 0xFFE), 4) >> 16 == 0xFFFF        # past the 4 KiB: ones


def test_bars_decode_where_programmed_while_memory_space_is_on(rig):
    bus, host, f, devfn = rig
    w = lambda off, size, v: host.mmio_write(0, ecam(3, off), size, v)
    w(P.PCI_BASE_ADDRESS_0, 4, MMIO + 0x4000)
    w(P.PCI_BASE_ADDRESS_0 + 8, 4, MMIO + 0x10000)
    w(P.PCI_BASE_ADDRESS_0 + 12, 4, 0)
    assert host.mapped_bars() == {}                           # decoding off
    w(P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY)
    assert host.mapped_bars() == {(devfn, 0): MMIO + 0x4000, (devfn, 2): MMIO + 0x10000}
    assert bus.read(1, MMIO + 0x4000 + 0x18, 4) == 0x5A
    bus.write(2, MMIO + 0x10000 + 4, 2, 7)
    assert f.accesses == [("read", 0, 0x18, 4), ("write", 2, 4, 2, 7)]
    w(P.PCI_BASE_ADDRESS_0, 4, MMIO + 0x8000)                 # Linux moves a BAR
    assert host.mapped_bars()[(devfn, 0)] == MMIO + 0x8000
    assert bus.find(MMIO + 0x4000) is None
    w(P.PCI_COMMAND, 2, 0)
    assert host.mapped_bars() == {} and bus.find(MMIO + 0x8000) is None


def test_a_bar_outside_the_window_or_over_another_is_not_mapped_and_counted(rig, caplog):
    bus, host, f, devfn = rig
    other = Function(0x1044)
    other_devfn = host.add(4, other)
    w = lambda dev, off, size, v: host.mmio_write(0, ecam(dev, off), size, v)
    w(3, P.PCI_BASE_ADDRESS_0, 4, 0x0800_0000)                # over the GIC, outside the window
    with caplog.at_level(logging.WARNING):
        w(3, P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY)
        w(3, P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER)   # the same again
    assert (devfn, 0) not in host.mapped_bars() and host.bar_refusals == 4   # BARs 0 and 2 (at 0), at each write
    assert sum("BAR0 at 0x8000000" in r.message for r in caplog.records) == 1
    w(3, P.PCI_BASE_ADDRESS_0, 4, MMIO)
    w(4, P.PCI_BASE_ADDRESS_0, 4, MMIO)                       # the same place as device 3's
    w(4, P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY)
    assert host.mapped_bars()[(devfn, 0)] == MMIO and (other_devfn, 0) not in host.mapped_bars()
    w(4, P.PCI_BASE_ADDRESS_0, 4, MMIO + 0x4000)              # moved to a free place: mapped
    assert host.mapped_bars()[(other_devfn, 0)] == MMIO + 0x4000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([3, 4, 9]), st.integers(0, 0x1003), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1)), max_size=60))
def test_any_config_write_sequence_is_safe(writes):
    """Every width at every offset, any value: nothing raises, read-only bytes keep their value,
    and the BARs that decode lie inside the window without overlapping."""
    bus = MmioBus()
    host = PciHost(bus, MMIO, MMIO_SIZE)
    functions = {3: Function(), 4: Function(0x1044)}
    for dev, f in functions.items():
        host.add(dev, f)
    frozen = {dev: bytes(b for b, m in zip(f.config.data, f.config.wmask) if not m) for dev, f in functions.items()}
    for dev, offset, size, value in writes:
        host.mmio_write(0, ecam(dev, offset), size, value & ((1 << (8 * size)) - 1))
        host.mmio_read(0, ecam(dev, offset), size)
    for dev, f in functions.items():
        assert bytes(b for b, m in zip(f.config.data, f.config.wmask) if not m) == frozen[dev]
    spans = sorted((a, a + functions[devfn >> 3].config.bars[i].size) for (devfn, i), a in host.mapped_bars().items())
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert b <= c
    assert all(MMIO <= a and b <= MMIO + MMIO_SIZE for a, b in spans)
