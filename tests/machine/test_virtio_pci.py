"""The virtio-pci modern transport, device side (virtio 1.2, 4.1), on the host: a driver written
here the way Linux's virtio_pci_modern probes and sets up a device, each rule of the common
configuration (4.1.4.3), notifications, interrupts, resets, and a property test of a hostile
guest's accesses."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmits.machine.bus import MmioBus
from kvmits.machine.devices.virtio import pci as V
from kvmits.machine.devices.virtio.pci import NotifyAddress, VirtioPciFunction
from kvmits.machine.devices.virtio.virtqueue import (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                                                     VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtqueueError)
from kvmits.machine.pci import PciHost
from kvmits.machine.pci import config as P
from kvmits.machine.pci import msix as M
from tests.machine.pci_fakes import RecordingMsixSink as Sink
from tests.machine.virtio_fakes import BASE, DOORBELL, FakeRam

DESC, AVAIL, USED = BASE, BASE + 0x1000, BASE + 0x2000          # queue 0's rings
BUF = BASE + 0x8000
F_DEVICE_BIT0 = 1 << 0                                           # a device-specific feature


class FakeDevice:
    """A device as a virtio device model would be: it pops what the driver made available,
    gives it back, interrupts when the queue asks, and reports a broken queue (2.1.2)."""

    device_type = 4                                              # entropy: device ID 0x1044
    pci_class = 0x00FF00
    config_size = 8

    def __init__(self, features=F_DEVICE_BIT0 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC,
                 sizes=(8, 16)):
        self.device_features = features
        self.queue_max_sizes = sizes
        self.cfg = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")
        self.function: VirtioPciFunction | None = None
        self.seen = []                      # (queue, chain) the device popped
        self.notified = []                  # (queue, virtqueue)
        self.resets = 0

    def config_read(self, offset, size):
        assert offset + size <= self.config_size                  # the transport bounds it
        return int.from_bytes(self.cfg[offset:offset + size], "little")

    def config_write(self, offset, size, value):
        assert offset + size <= self.config_size
        self.cfg[offset:offset + size] = value.to_bytes(size, "little")

    def notify(self, index, vq):
        self.notified.append((index, vq))
        for _ in range(vq.size + 1):                               # bounded, as a device must be
            chain = vq.pop()
            if chain is None:
                break
            if isinstance(chain, VirtqueueError):
                self.function.set_needs_reset(chain, vq.broken_detail, index)
                break
            self.seen.append((index, chain))
            vq.push(chain.head, chain.writable)
        if vq.needs_interrupt():
            self.function.notify_used(index)

    def reset(self):
        self.resets += 1


def make(**kw):
    ram, sink, dev = FakeRam(), Sink(), FakeDevice(**kw)
    fn = VirtioPciFunction(dev, ram, sink, name="vtest")
    dev.function = fn
    return fn, dev, ram, sink


class Driver:
    """The driver side, in the order of Linux 6.1's virtio_pci_modern.c (vp_modern_probe,
    vp_modern_map_capability, vp_get_features / vp_finalize_features, setup_vq / vp_modern
    find_vqs) and virtio.c (virtio_dev_probe): it finds everything through configuration-space
    reads, never through the module's constants."""

    def __init__(self, fn: VirtioPciFunction):
        self.fn, self.cfg = fn, fn.config
        self.caps = {}                                       # cfg_type -> (bar, offset, length, cap offset)
        self.msix_cap = None
        ptr, hops = self.cfg.read(P.PCI_CAPABILITY_LIST, 1), 0
        while ptr and hops < 48:                             # bounded, as pci_find_next_capability
            cap_id = self.cfg.read(ptr, 1)
            if cap_id == P.PCI_CAP_ID_VNDR:
                cfg_type = self.cfg.read(ptr + V.VIRTIO_PCI_CAP_CFG_TYPE, 1)
                self.caps.setdefault(cfg_type, (self.cfg.read(ptr + V.VIRTIO_PCI_CAP_BAR, 1),
                                                self.cfg.read(ptr + V.VIRTIO_PCI_CAP_OFFSET, 4),
                                                self.cfg.read(ptr + V.VIRTIO_PCI_CAP_LENGTH, 4), ptr))
            elif cap_id == P.PCI_CAP_ID_MSIX:
                self.msix_cap = ptr
            ptr, hops = self.cfg.read(ptr + P.PCI_CAP_LIST_NEXT, 1), hops + 1
        ncap = self.caps[V.VIRTIO_PCI_CAP_NOTIFY_CFG][3]
        self.multiplier = self.cfg.read(ncap + V.VIRTIO_PCI_NOTIFY_CAP_MULT, 4)

    # accessors of one structure, by its capability
    def rd(self, cfg_type, offset, size):
        bar, base, _, _ = self.caps[cfg_type]
        return self.fn.bar_read(0, bar, base + offset, size)

    def wr(self, cfg_type, offset, size, value):
        bar, base, _, _ = self.caps[cfg_type]
        self.fn.bar_write(0, bar, base + offset, size, value)

    def common(self, offset, size, value=None):
        if value is None:
            return self.rd(V.VIRTIO_PCI_CAP_COMMON_CFG, offset, size)
        self.wr(V.VIRTIO_PCI_CAP_COMMON_CFG, offset, size, value)

    def status(self, value=None):
        return self.common(V.VIRTIO_PCI_COMMON_STATUS, 1, value)

    def add_status(self, bits):
        self.status(self.status() | bits)

    def reset(self):
        self.status(0)
        for _ in range(10):                                  # vp_reset: read until 0
            if self.status() == 0:
                return
        raise AssertionError("device_status did not read 0 after reset")

    def features(self):
        self.common(V.VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
        lo = self.common(V.VIRTIO_PCI_COMMON_DF, 4)
        self.common(V.VIRTIO_PCI_COMMON_DFSELECT, 4, 1)
        return self.common(V.VIRTIO_PCI_COMMON_DF, 4) << 32 | lo

    def finalize(self, features):
        """vp_finalize_features + virtio_features_ok: write, set FEATURES_OK, read it back."""
        self.common(V.VIRTIO_PCI_COMMON_GFSELECT, 4, 0)
        self.common(V.VIRTIO_PCI_COMMON_GF, 4, features & 0xFFFF_FFFF)
        self.common(V.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
        self.common(V.VIRTIO_PCI_COMMON_GF, 4, features >> 32)
        self.add_status(V.VIRTIO_CONFIG_S_FEATURES_OK)
        return bool(self.status() & V.VIRTIO_CONFIG_S_FEATURES_OK)

    def enable_msix(self, vectors):
        """pci_enable_msix: program and unmask table entries (BAR from the capability), then
        MSI-X Enable."""
        bir_table = self.cfg.read(self.msix_cap + M.PCI_MSIX_TABLE, 4)
        bar, table = bir_table & M.PCI_MSIX_BIR, bir_table & ~M.PCI_MSIX_BIR
        for v in vectors:
            entry = table + v * M.PCI_MSIX_ENTRY_SIZE
            self.fn.bar_write(0, bar, entry, 4, DOORBELL)
            self.fn.bar_write(0, bar, entry + 4, 4, 0)
            self.fn.bar_write(0, bar, entry + 8, 4, 0x100 + v)
            self.fn.bar_write(0, bar, entry + 12, 4, 0)
        self.cfg.write(self.msix_cap + M.PCI_MSIX_FLAGS, 2, M.PCI_MSIX_FLAGS_ENABLE)

    def setup_queue(self, index, size, desc, avail, used, vector):
        """setup_vq: select, size (0: no such queue), vector read back, the three addresses as
        32-bit halves, notify offset; queue_enable comes in find_vqs, after all queues."""
        self.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        max_size = self.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2)
        if max_size == 0 or self.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2):
            return None
        self.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, min(size, max_size))
        self.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        if self.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2) == V.VIRTIO_MSI_NO_VECTOR and vector != V.VIRTIO_MSI_NO_VECTOR:
            return None                                      # -EBUSY in Linux
        for offset, addr in ((V.VIRTIO_PCI_COMMON_Q_DESCLO, desc), (V.VIRTIO_PCI_COMMON_Q_AVAILLO, avail),
                             (V.VIRTIO_PCI_COMMON_Q_USEDLO, used)):
            self.common(offset, 4, addr & 0xFFFF_FFFF)
            self.common(offset + 4, 4, addr >> 32)
        notify_off = self.common(V.VIRTIO_PCI_COMMON_Q_NOFF, 2)
        return self.caps[V.VIRTIO_PCI_CAP_NOTIFY_CFG][1] + notify_off * self.multiplier

    def enable_queue(self, index):
        self.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        self.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    def notify(self, notify_at, index):
        """vp_notify: iowrite16(queue index, notify address)."""
        self.fn.bar_write(0, self.caps[V.VIRTIO_PCI_CAP_NOTIFY_CFG][0], notify_at, 2, index)

    def bring_up(self, vectors=True, size=8):
        """virtio_dev_probe up to DRIVER_OK, with queue 0 on vector 1 and config on vector 0."""
        self.reset()
        self.add_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
        assert self.finalize(self.features())
        if vectors:
            self.enable_msix(range(3))
            self.common(V.VIRTIO_PCI_COMMON_MSIX, 2, 0)
        at = self.setup_queue(0, size, DESC, AVAIL, USED, 1 if vectors else V.VIRTIO_MSI_NO_VECTOR)
        self.enable_queue(0)
        self.add_status(V.VIRTIO_CONFIG_S_DRIVER_OK)
        return at


def make_available(ram, head=0, buffers=((BUF, 16, 0), (BUF + 0x100, 32, VIRTQ_DESC_F_WRITE)), avail_idx=1):
    """Put one chain at descriptor `head` and publish it as avail idx `avail_idx` (2.7.13)."""
    for i, (addr, length, flags) in enumerate(buffers):
        last = i == len(buffers) - 1
        ram.poke(DESC + 16 * (head + i), "QIHH", addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), head + i + 1)
    ram.poke(AVAIL + 4 + 2 * ((avail_idx - 1) % 8), "H", head)
    ram.poke(AVAIL + 2, "H", avail_idx)


# -- the header and the capabilities ---------------------------------------------------------------
def test_the_header_is_a_non_transitional_virtio_device():
    """4.1.2.1: vendor 0x1AF4, device 0x1040 + type, revision >= 1, subsystem ID >= 0x40."""
    fn, _, _, _ = make()
    c = fn.config
    assert c.read(P.PCI_VENDOR_ID, 2) == 0x1AF4 and c.read(P.PCI_DEVICE_ID, 2) == 0x1044
    assert c.read(P.PCI_REVISION_ID, 1) == 1
    assert c.read(P.PCI_CLASS_PROG, 3) == 0x00FF00                  # the device's class code
    assert c.read(P.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4 and c.read(P.PCI_SUBSYSTEM_ID, 2) >= 0x40
    assert c.read(P.PCI_INTERRUPT_PIN, 1) == 0                       # no INTx
    for bar, size in ((0, V.VIRTIO_BAR_SIZE), (2, 0x1000)):         # BAR sizing: all ones, read the mask
        c.write(P.PCI_BASE_ADDRESS_0 + 4 * bar, 4, 0xFFFF_FFFF)
        assert c.read(P.PCI_BASE_ADDRESS_0 + 4 * bar, 4) == ~(size - 1) & 0xFFFF_FFFF
    assert c.read(P.PCI_BASE_ADDRESS_0 + 4, 4) == 0                   # BAR 1 is not implemented


def test_the_capabilities_follow_the_alignment_rules_of_4_1_4():
    fn, dev, _, _ = make()
    d = Driver(fn)
    assert set(d.caps) == {V.VIRTIO_PCI_CAP_COMMON_CFG, V.VIRTIO_PCI_CAP_NOTIFY_CFG, V.VIRTIO_PCI_CAP_ISR_CFG,
                           V.VIRTIO_PCI_CAP_DEVICE_CFG, V.VIRTIO_PCI_CAP_PCI_CFG}
    for cfg_type, (bar, offset, length, ptr) in d.caps.items():
        cap_len = fn.config.read(ptr + V.VIRTIO_PCI_CAP_LEN, 1)
        assert cap_len == (20 if cfg_type in (V.VIRTIO_PCI_CAP_NOTIFY_CFG, V.VIRTIO_PCI_CAP_PCI_CFG) else 16)
        if cfg_type != V.VIRTIO_PCI_CAP_PCI_CFG:
            assert bar == 0 and length and offset + length <= fn.config.bars[bar].size
    bar, off, length, _ = d.caps[V.VIRTIO_PCI_CAP_COMMON_CFG]
    assert off % 4 == 0 and length >= 0x38                 # Linux wants the whole 1.0 structure
    _, off, length, _ = d.caps[V.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert off % 2 == 0 and d.multiplier % 2 == 0 and length >= len(dev.queue_max_sizes) * d.multiplier
    _, off, length, _ = d.caps[V.VIRTIO_PCI_CAP_DEVICE_CFG]
    assert off % 4 == 0 and length == dev.config_size
    table = fn.config.read(d.msix_cap + M.PCI_MSIX_TABLE, 4)
    assert table & M.PCI_MSIX_BIR == V.MSIX_BAR
    assert fn.config.read(d.msix_cap + M.PCI_MSIX_FLAGS, 2) & M.PCI_MSIX_FLAGS_QSIZE == len(dev.queue_max_sizes)


def test_no_device_config_capability_for_a_device_without_config():
    class NoConfig(FakeDevice):
        config_size = 0
    fn = VirtioPciFunction(NoConfig(), FakeRam(), Sink())
    assert V.VIRTIO_PCI_CAP_DEVICE_CFG not in Driver(fn).caps
    assert fn.bar_read(0, 0, V.DEVICE_CFG_OFFSET, 4) == 0


def test_a_device_offering_an_unimplemented_transport_feature_is_refused():
    with pytest.raises(ValueError, match="not implemented"):
        make(features=1 << 40)                                      # VIRTIO_F_RING_RESET
    with pytest.raises(ValueError, match="power of 2"):
        make(sizes=(8, 12))


# -- the Linux sequence ------------------------------------------------------------------------------
def test_the_linux_modern_sequence_sets_up_a_queue_the_device_uses():
    fn, dev, ram, sink = make()
    d = Driver(fn)
    d.reset()
    d.add_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
    offered = d.features()
    assert offered >> V.VIRTIO_F_VERSION_1 & 1                     # 6.1, or Linux fails the probe
    assert offered == dev.device_features | 1 << V.VIRTIO_F_VERSION_1
    assert d.finalize(1 << V.VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX)      # no INDIRECT_DESC
    assert fn.status == V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER | V.VIRTIO_CONFIG_S_FEATURES_OK
    d.enable_msix(range(3))
    d.common(V.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    assert d.common(V.VIRTIO_PCI_COMMON_MSIX, 2) == 0
    assert d.common(V.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    at0 = d.setup_queue(0, 8, DESC, AVAIL, USED, 1)
    at1 = d.setup_queue(1, 4, DESC + 0x4000, AVAIL + 0x4000, USED + 0x4000, 2)
    assert d.setup_queue(2, 8, 0, 0, 0, 1) is None                   # queue_size 0: not there
    assert at0 != at1 and fn.queue(0) is None                        # not enabled yet
    d.enable_queue(0)
    d.enable_queue(1)
    vq = fn.queue(0)
    assert (vq.size, vq.desc, vq.avail, vq.used) == (8, DESC, AVAIL, USED)
    assert vq.event_idx and not vq.indirect_desc                     # what was negotiated
    assert fn.queue(1).size == 4
    d.add_status(V.VIRTIO_CONFIG_S_DRIVER_OK)
    ram.poke(AVAIL + 4 + 2 * 8, "H", 0)                              # used_event = 0: interrupt at the first
    make_available(ram)
    sink.calls.clear()
    d.notify(at0, 0)
    assert dev.notified == [(0, vq)]
    (queue, chain), = dev.seen
    assert queue == 0 and chain.buffers == [(BUF, 16, False), (BUF + 0x100, 32, True)]
    assert ram.peek(USED + 2, "H") == (1,) and ram.peek(USED + 4, "II") == (0, 32)
    assert sink.calls == [("fire", 1)]                               # queue 0's vector
    assert fn.notify_address(0) == NotifyAddress(0, at0, 2, None)
    assert fn.notify_address(1) == NotifyAddress(0, at1, 2, None)


def test_features_ok_is_refused_for_features_not_offered():
    """3.1.1 step 5-6: FEATURES_OK reads back clear when the driver accepted more than was
    offered, or (modern-only device, 6.1) did not accept VERSION_1."""
    fn, dev, _, _ = make()
    d = Driver(fn)
    d.reset()
    d.add_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
    assert not d.finalize(d.features() | 1 << 5)                     # bit 5 not offered
    assert not d.finalize(F_DEVICE_BIT0)                             # no VERSION_1
    assert fn.refused_features == 2
    assert d.finalize(1 << V.VIRTIO_F_VERSION_1 | F_DEVICE_BIT0)
    assert fn.negotiated(0) and not fn.negotiated(VIRTIO_RING_F_EVENT_IDX)
    d.common(V.VIRTIO_PCI_COMMON_GFSELECT, 4, 0)                     # frozen after FEATURES_OK
    d.common(V.VIRTIO_PCI_COMMON_GF, 4, 0)
    assert d.common(V.VIRTIO_PCI_COMMON_GF, 4) == F_DEVICE_BIT0 and fn.bad_accesses == 1


def test_writing_0_to_device_status_resets_the_device_and_every_queue():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    at = d.bring_up()
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, 2)
    dev.resets = 0
    d.status(0)
    assert d.status() == 0 and dev.resets == 1
    assert fn.queue(0) is None and fn.driver_features == 0
    for index, max_size in enumerate(dev.queue_max_sizes):
        d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        assert d.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
        assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == max_size   # 4.1.4.3.2: back to the maximum
        assert d.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2) == V.VIRTIO_MSI_NO_VECTOR
        assert d.common(V.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0
    assert d.common(V.VIRTIO_PCI_COMMON_MSIX, 2) == V.VIRTIO_MSI_NO_VECTOR
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
    make_available(ram)
    d.notify(at, 0)                                                   # queue 0 is gone
    assert dev.notified == [] and fn.dropped_notifies == 1
    d.bring_up()                                                      # and comes back
    assert fn.queue(0) is not None and fn.queue(0).last_avail_idx == 0


# -- interrupts ------------------------------------------------------------------------------------
def test_msix_vectors_route_queue_and_config_notifications():
    fn, dev, ram, sink = make()
    d = Driver(fn)
    d.bring_up()
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    d.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2, 3)                        # the table has 3 vectors
    assert d.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2) == V.VIRTIO_MSI_NO_VECTOR
    d.common(V.VIRTIO_PCI_COMMON_MSIX, 2, 0x7FF)
    assert d.common(V.VIRTIO_PCI_COMMON_MSIX, 2) == V.VIRTIO_MSI_NO_VECTOR
    d.common(V.VIRTIO_PCI_COMMON_MSIX, 2, 0)
    assert ("route", 1, DOORBELL, 0x101) in sink.calls                # routed on enable
    sink.calls.clear()
    assert fn.notify_used(0) and fn.config_changed()
    assert sink.calls == [("fire", 1), ("fire", 0)]
    assert fn.isr == V.VIRTIO_PCI_ISR_CONFIG                          # 4.1.4.5.1: config bit even with MSI-X
    sink.calls.clear()
    table = fn.msix.table_offset + 1 * M.PCI_MSIX_ENTRY_SIZE + M.PCI_MSIX_ENTRY_VECTOR_CTRL
    fn.bar_write(0, V.MSIX_BAR, table, 4, 1)                          # mask vector 1
    assert not fn.notify_used(0) and sink.calls == [] and fn.msix.is_pending(1)
    fn.bar_write(0, V.MSIX_BAR, table, 4, 0)                          # unmask: replayed
    assert sink.calls == [("route", 1, DOORBELL, 0x101), ("fire", 1)]
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    d.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0)                      # refused: never disable
    assert fn.queue(0) is not None
    d.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2, V.VIRTIO_MSI_NO_VECTOR)    # queue 0: no notifications
    sink.calls.clear()
    assert not fn.notify_used(0) and sink.calls == [] and fn.no_vector == 1


def test_without_msix_the_isr_says_why_and_clears_on_read():
    fn, dev, ram, sink = make()
    d = Driver(fn)
    d.bring_up(vectors=False)
    isr = lambda size=1: d.rd(V.VIRTIO_PCI_CAP_ISR_CFG, 0, size)    # noqa: E731
    assert isr() == 0
    gen = d.common(V.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    assert not fn.notify_used(0)
    assert isr() == V.VIRTIO_PCI_ISR_QUEUE and isr() == 0             # read-to-clear
    fn.config_changed()
    fn.notify_used(0)
    assert isr(4) == V.VIRTIO_PCI_ISR_QUEUE | V.VIRTIO_PCI_ISR_CONFIG and isr() == 0
    assert d.common(V.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == (gen + 1) & 0xFF
    assert fn.intx_less == 3 and sink.calls == []
    fn.bar_write(0, 0, V.ISR_CFG_OFFSET, 1, 0xFF)                     # read-only
    assert isr() == 0


def test_no_notification_before_driver_ok():
    """3.1.2: no used buffer notifications before DRIVER_OK; a driver notify then is looked
    at when DRIVER_OK is set."""
    fn, dev, ram, sink = make()
    d = Driver(fn)
    d.reset()
    d.add_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
    assert d.finalize(d.features())
    at = d.setup_queue(0, 8, DESC, AVAIL, USED, V.VIRTIO_MSI_NO_VECTOR)
    d.enable_queue(0)
    make_available(ram)
    d.notify(at, 0)
    assert dev.notified == [] and fn.deferred_notifies == 1
    assert not fn.notify_used(0) and fn.isr == 0
    d.add_status(V.VIRTIO_CONFIG_S_DRIVER_OK)
    assert [i for i, _ in dev.notified] == [0] and len(dev.seen) == 1


def test_notifies_for_missing_or_disabled_queues_are_counted_and_dropped():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    at = d.bring_up()
    notify_base = d.caps[V.VIRTIO_PCI_CAP_NOTIFY_CFG][1]
    d.notify(notify_base + 1 * d.multiplier, 1)                       # queue 1: not enabled
    d.notify(notify_base + 7 * d.multiplier, 7)                       # queue 7: none
    fn.bar_write(0, 0, at + 1, 1, 0)                                   # not a notify address
    assert fn.notify_queue(5000) is False
    assert dev.notified == [] and fn.dropped_notifies == 4
    assert fn.bar_read(0, 0, at, 2) == 0                               # write-only region
    fn.bar_write(0, 0, at, 4, 0xDEAD)                                  # any width, any value: queue 0
    assert [i for i, _ in dev.notified] == [0]
    with pytest.raises(IndexError):
        fn.notify_address(2)


# -- needs reset -----------------------------------------------------------------------------------
def test_a_queue_the_virtqueue_refuses_sets_needs_reset_and_a_config_interrupt(caplog):
    fn, dev, ram, sink = make()
    d = Driver(fn)
    d.bring_up()
    sink.calls.clear()
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        d.setup_queue(1, 4, DESC + 8, AVAIL, USED, 2)                  # descriptor table misaligned
        d.enable_queue(1)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0 and fn.queue(1) is None
    assert d.status() & V.VIRTIO_CONFIG_S_NEEDS_RESET
    assert fn.needs_reset[V.QUEUE_CONFIG_REFUSED] == 2
    assert sink.calls == [("fire", 0)]                                 # 2.1.2: once, on the config vector
    assert sum("DEVICE_NEEDS_RESET" in r.message for r in caplog.records) == 1
    d.add_status(V.VIRTIO_CONFIG_S_FAILED)                              # the driver cannot clear it
    assert d.status() & V.VIRTIO_CONFIG_S_NEEDS_RESET
    d.reset()
    assert d.status() == 0


def test_a_broken_virtqueue_sets_needs_reset():
    fn, dev, ram, sink = make()
    d = Driver(fn)
    at = d.bring_up()
    ram.poke(AVAIL + 4, "H", 99)                                       # head past the queue size
    ram.poke(AVAIL + 2, "H", 1)
    sink.calls.clear()
    d.notify(at, 0)
    assert d.status() & V.VIRTIO_CONFIG_S_NEEDS_RESET
    assert fn.needs_reset == {"HEAD_OUT_OF_RANGE": 1}
    assert fn.stats.errors[VirtqueueError.HEAD_OUT_OF_RANGE] == 1
    assert sink.calls == [("fire", 0)]


# -- the rules of the common configuration ---------------------------------------------------------
def test_the_driver_sets_only_driver_status_bits():
    """2.1: DEVICE_NEEDS_RESET is the device's to set; bits 16 and 32 are reserved."""
    fn, dev, ram, _ = make()
    d = Driver(fn)
    d.status(0xFF)
    assert d.status() == V.DRIVER_STATUS_BITS & ~V.VIRTIO_CONFIG_S_FEATURES_OK   # nothing accepted yet
    assert fn.refused_features == 1


def test_fields_take_writes_of_their_width_only_and_reads_of_any_width():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 4, 1)                       # a 4-byte write to a le16
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0 and fn.bad_accesses == 1
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 4) == 16 << 16 | 1   # select and queue 1's size
    d.common(V.VIRTIO_PCI_COMMON_Q_DESCLO, 8, 0x1234_5678_9ABC_DEF0)   # a 64-bit field at once
    assert d.common(V.VIRTIO_PCI_COMMON_Q_DESCHI, 4) == 0x1234_5678
    assert d.common(V.VIRTIO_PCI_COMMON_Q_DESCLO, 8) == 0x1234_5678_9ABC_DEF0
    assert d.common(V.VIRTIO_PCI_COMMON_Q_DESCLO + 1, 2) == 0xBCDE
    d.common(V.VIRTIO_PCI_COMMON_NUMQ, 2, 7)                           # read-only
    assert d.common(V.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert d.common(0x100, 4) == 0 and d.common(V.VIRTIO_PCI_COMMON_Q_RESET, 2) == 0


def test_queue_select_size_and_feature_select_bounds():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0xFFFF)                  # no such queue
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0 and d.common(V.VIRTIO_PCI_COMMON_Q_NOFF, 2) == 0
    d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, 4)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
    d.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    for bad in (12, 32, 0):                                            # not a power of 2, past max 16, 0
        d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, bad)
        assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16
    d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, 2)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 2 and fn.bad_queue_sizes == 3
    for select in (2, 0xFFFF_FFFF):                                    # past the 64 feature bits
        d.common(V.VIRTIO_PCI_COMMON_DFSELECT, 4, select)
        assert d.common(V.VIRTIO_PCI_COMMON_DF, 4) == 0
        d.common(V.VIRTIO_PCI_COMMON_GFSELECT, 4, select)
        d.common(V.VIRTIO_PCI_COMMON_GF, 4, 0xFFFF_FFFF)
        assert d.common(V.VIRTIO_PCI_COMMON_GF, 4) == 0 and fn.driver_features == 0


def test_an_enabled_queue_keeps_its_configuration():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    d.bring_up()
    for offset, size in ((V.VIRTIO_PCI_COMMON_Q_SIZE, 2), (V.VIRTIO_PCI_COMMON_Q_DESCLO, 4),
                         (V.VIRTIO_PCI_COMMON_Q_USEDHI, 4)):
        d.common(offset, size, 2)
    vq = fn.queue(0)
    assert (vq.size, vq.desc, vq.used) == (8, DESC, USED)
    assert d.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 8 and d.common(V.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == DESC


def test_device_config_is_the_devices_and_changes_bump_the_generation():
    fn, dev, ram, _ = make()
    d = Driver(fn)
    assert d.rd(V.VIRTIO_PCI_CAP_DEVICE_CFG, 0, 4) == 0x4433_2211
    assert d.rd(V.VIRTIO_PCI_CAP_DEVICE_CFG, 6, 2) == 0x8877
    assert d.rd(V.VIRTIO_PCI_CAP_DEVICE_CFG, 6, 4) == 0               # past config_size
    d.wr(V.VIRTIO_PCI_CAP_DEVICE_CFG, 2, 2, 0xBEEF)
    assert dev.cfg[2:4] == b"\xef\xbe"
    gen = d.common(V.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    fn.config_changed()
    assert d.common(V.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == gen + 1
    fn.config_generation = 0xFF
    fn.config_changed()
    assert d.common(V.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == 0        # u8, wraps


def test_the_pci_cfg_window_reaches_the_bar_through_config_space():
    """4.1.4.9: bar, offset, length then pci_cfg_data accesses the BAR."""
    fn, dev, ram, _ = make()
    d = Driver(fn)
    cap = d.caps[V.VIRTIO_PCI_CAP_PCI_CFG][3]
    c = fn.config
    c.write(cap + V.VIRTIO_PCI_CAP_BAR, 1, 0)
    c.write(cap + V.VIRTIO_PCI_CAP_OFFSET, 4, V.COMMON_CFG_OFFSET + V.VIRTIO_PCI_COMMON_NUMQ)
    c.write(cap + V.VIRTIO_PCI_CAP_LENGTH, 4, 2)
    assert c.read(cap + V.VIRTIO_PCI_CFG_DATA, 4) & 0xFFFF == 2         # num_queues
    c.write(cap + V.VIRTIO_PCI_CAP_OFFSET, 4, V.COMMON_CFG_OFFSET + V.VIRTIO_PCI_COMMON_STATUS)
    c.write(cap + V.VIRTIO_PCI_CAP_LENGTH, 4, 1)
    c.write(cap + V.VIRTIO_PCI_CFG_DATA, 1, V.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert fn.status == V.VIRTIO_CONFIG_S_ACKNOWLEDGE
    c.write(cap + V.VIRTIO_PCI_CAP_LENGTH, 4, 3)                        # not 1, 2, 4: a scratch register
    c.write(cap + V.VIRTIO_PCI_CFG_DATA, 1, 0)
    assert fn.status == V.VIRTIO_CONFIG_S_ACKNOWLEDGE


def test_through_the_host_bridge_after_linux_assigns_the_bars():
    mmio, ecam = 0x1000_0000, 0x3F00_0000
    bus = MmioBus()
    host = PciHost(bus, mmio, 0x100_0000)
    bus.add(ecam, 1 << 20, host, "ecam")
    fn, dev, ram, _ = make()
    devfn = host.add(2, fn)
    cfg = ecam | devfn << 12
    bus.write(0, cfg + P.PCI_BASE_ADDRESS_0, 4, mmio + 0x10000)
    bus.write(0, cfg + P.PCI_BASE_ADDRESS_0 + 8, 4, mmio + 0x20000)
    bus.write(0, cfg + P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY | P.PCI_COMMAND_MASTER)
    assert bus.read(0, cfg + P.PCI_VENDOR_ID, 4) == 0x1044 << 16 | 0x1AF4
    assert bus.read(0, mmio + 0x10000 + V.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    bus.write(0, mmio + 0x20000, 4, DOORBELL)                           # the MSI-X table in BAR 2
    assert fn.msix.message(0) == (DOORBELL, 0)
    notify = fn.notify_address(1)
    assert fn.config.bar_address(notify.bar) + notify.offset == mmio + 0x10000 + V.NOTIFY_CFG_OFFSET + 4


# -- a hostile guest ---------------------------------------------------------------------------------
#: offsets anywhere, and more often near the start of each structure (and of the capabilities)
OFFSET = st.one_of(st.integers(0, 0x4010),
                   st.sampled_from([0, 0x40, 0x1000, 0x2000, 0x3000, 0x3FF8])
                   .flatmap(lambda b: st.integers(b, b + 0x48)))
ACCESS = st.tuples(st.sampled_from(["config", "bar0", "bar2", "bar5", "host-notify"]), OFFSET,
                   st.sampled_from([1, 2, 4, 8]), st.booleans(), st.integers(0, (1 << 64) - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(ACCESS, max_size=80), st.booleans())
def test_any_access_of_any_width_at_any_offset_is_safe(accesses, bring_up):
    """Configuration space and the BARs, from a brought-up device or a fresh one: nothing
    raises, reads fit their width, the IDs and num_queues never change, and the registers
    keep the invariants of 4.1.4.3 (queue sizes powers of 2 within the maximum, vectors in the
    table or NO_VECTOR, no reserved status bits)."""
    fn, dev, ram, _ = make()
    if bring_up:
        Driver(fn).bring_up()
    for space, offset, size, is_write, value in accesses:
        value &= (1 << 8 * size) - 1
        if space == "config":
            offset &= 0xFFF
            if is_write:
                fn.config.write(offset, size, value)
            else:
                assert 0 <= fn.config.read(offset, size) < 1 << 8 * size
        elif space == "host-notify":
            fn.notify_queue(offset & 0x7FF)
        else:
            bar = int(space[3:])
            if is_write:
                fn.bar_write(0, bar, offset, size, value)
            else:
                assert 0 <= fn.bar_read(0, bar, offset, size) < 1 << 8 * size
    assert fn.config.read(P.PCI_VENDOR_ID, 4) == 0x1044 << 16 | 0x1AF4
    assert fn.bar_read(0, 0, V.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert not fn.status & ~(V.DRIVER_STATUS_BITS | V.VIRTIO_CONFIG_S_NEEDS_RESET)
    assert fn.config_msix_vector < fn.msix.vectors or fn.config_msix_vector == V.VIRTIO_MSI_NO_VECTOR
    for q in fn.queues:
        assert 1 <= q.size <= q.max_size and not q.size & (q.size - 1)
        assert q.msix_vector < fn.msix.vectors or q.msix_vector == V.VIRTIO_MSI_NO_VECTOR
        assert q.enabled == (q.vq is not None)
        if q.vq is not None:
            assert (q.vq.size, q.vq.desc, q.vq.avail, q.vq.used) == (q.size, q.desc, q.driver, q.device)
