"""MMIO dispatch by address range; unclaimed accesses."""

import logging

import pytest

from kvmits.machine.bus import MmioBus


class Recorder:
    def __init__(self, value=0):
        self.value = value
        self.log = []

    def mmio_read(self, vcpu, offset, size):
        self.log.append(("r", vcpu, offset, size))
        return self.value

    def mmio_write(self, vcpu, offset, size, value):
        self.log.append(("w", vcpu, offset, size, value))


def test_dispatch_by_range_with_offsets():
    bus = MmioBus()
    a, b, c = Recorder(0xA), Recorder(0xB), Recorder(0xC)
    bus.add(0x0A000000, 0x1000, b, "b")        # added out of order on purpose
    bus.add(0x09000000, 0x1000, a, "a")
    bus.add(0x0B000000, 0x20000, c, "c")
    assert bus.read(1, 0x09000018, 4) == 0xA
    assert bus.read(0, 0x0A000FFF, 1) == 0xB
    bus.write(3, 0x0B01FFF8, 8, 0x1122334455667788)
    assert a.log == [("r", 1, 0x18, 4)]
    assert b.log == [("r", 0, 0xFFF, 1)]
    assert c.log == [("w", 3, 0x1FFF8, 8, 0x1122334455667788)]
    assert [name for _, _, name, _ in bus.devices()] == ["a", "b", "c"]
    assert bus.find(0x0A000010) == (0x0A000000, b) and bus.find(0x0A001000) is None


def test_edges_belong_to_the_right_device():
    bus = MmioBus()
    lo, hi = Recorder(1), Recorder(2)
    bus.add(0x1000, 0x1000, lo)
    bus.add(0x2000, 0x1000, hi)
    assert [bus.read(0, gpa, 4) for gpa in (0xFFF, 0x1000, 0x1FFF, 0x2000, 0x2FFF, 0x3000)] == [0, 1, 1, 2, 2, 0]


def test_overlaps_are_refused():
    bus = MmioBus()
    bus.add(0x1000, 0x1000, Recorder())
    for base, size in ((0x1800, 0x1000), (0x0800, 0x1000), (0x1000, 1), (0x0, 0x10000)):
        with pytest.raises(ValueError, match="overlaps"):
            bus.add(base, size, Recorder())
    bus.add(0x2000, 0x10, Recorder())          # adjacent is fine
    with pytest.raises(ValueError):
        bus.add(0x3000, 0, Recorder())


def test_unclaimed_reads_zero_and_is_logged_once_per_address(caplog):
    bus = MmioBus()
    bus.add(0x1000, 0x1000, Recorder(7))
    with caplog.at_level(logging.WARNING, logger="kvmits.machine.bus"):
        assert bus.read(0, 0x5000, 4) == 0
        assert bus.read(1, 0x5000, 4) == 0
        bus.write(0, 0x5000, 4, 1)
        bus.write(0, 0x6000, 2, 0xBEEF)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert "0x5000" in msgs[0] and "read" in msgs[0]
    assert "0x6000" in msgs[1] and "0xbeef" in msgs[1]
    assert bus.unclaimed_count == 4
    assert bus.unclaimed_addresses() == {0x5000, 0x6000}


def test_remove():
    bus = MmioBus()
    dev = Recorder(5)
    bus.add(0x1000, 0x100, dev)
    bus.remove(dev)
    assert bus.read(0, 0x1000, 4) == 0
    with pytest.raises(ValueError):
        bus.remove(dev)
