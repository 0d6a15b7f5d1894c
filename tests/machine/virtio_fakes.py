"""Test doubles of the virtio device tests: guest RAM that records the device's writes, and a
driver that brings a VirtioPciFunction up and makes descriptor chains available the way
Linux's virtio_pci_modern and virtio_ring do (virtio 1.2: 3.1.1 initialization, 4.1.4.3 the
common configuration, 2.7.13 supplying buffers, 2.7.14 receiving used buffers)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmits.errors import GuestMemoryError
from kvmits.machine.devices.virtio import pci as V
from kvmits.machine.devices.virtio.virtqueue import (VIRTIO_RING_F_EVENT_IDX, VIRTQ_DESC_F_INDIRECT,
                                                     VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, used_ring_bytes)
from kvmits.machine.pci import msix as M

BASE = 0x4000_0000
RAM_SIZE = 4 << 20
RINGS = BASE                        # queue q's rings at RINGS + q * RING_STRIDE
RING_STRIDE = 0x10000
HEAP = BASE + 0x10_0000             # buffers and indirect tables, handed out by Driver.alloc
DOORBELL = 0x0809_0040              # the MSI-X address the driver programs


class FakeRam:
    """`size` bytes at `base`; an access outside raises GuestMemoryError (as GuestMemory).
    `writes` records every (gpa, length) written through write(), the device's side, and
    `on_write(gpa, length)`, if set, is called after each (a driver acting while the device
    works); `accesses` counts every read and write (refused ones too), to bound the work of
    one call; the test's side uses poke / peek / put / get, which neither check, count nor
    record. fill() is GuestMemory's, for a guest-side driver: a write() of `size` bytes."""

    def __init__(self, base: int = BASE, size: int = RAM_SIZE):
        self.base, self.size = base, size
        self.buf = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.accesses = 0                   # reads and writes
        self.outside = 0                    # accesses refused
        self.on_write = None

    def _off(self, gpa: int, size: int) -> int:
        self.accesses += 1
        if not (size >= 0 and self.base <= gpa and gpa + size <= self.base + self.size):
            self.outside += 1
            raise GuestMemoryError(gpa, size)
        return gpa - self.base

    def read(self, gpa: int, size: int) -> bytes:
        off = self._off(gpa, size)
        return bytes(self.buf[off:off + size])

    def write(self, gpa: int, data) -> None:
        off = self._off(gpa, len(data))
        self.buf[off:off + len(data)] = data
        self.writes.append((gpa, len(data)))
        if self.on_write is not None:
            self.on_write(gpa, len(data))

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * size)

    # the test's side
    def poke(self, gpa: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, self.buf, gpa - self.base, *values)

    def peek(self, gpa: int, fmt: str):
        return struct.unpack_from("<" + fmt, self.buf, gpa - self.base)

    def put(self, gpa: int, data: bytes) -> None:
        self.buf[gpa - self.base:gpa - self.base + len(data)] = data

    def get(self, gpa: int, size: int) -> bytes:
        return bytes(self.buf[gpa - self.base:gpa - self.base + size])


class Ring:
    """The driver's side of one split virtqueue (2.7.13 supplying buffers, 2.7.14 receiving used
    buffers), written from the spec independently of the device code: a free descriptor list,
    chains direct or through an indirect table, avail and used indices free-running mod 2**16.
    The descriptor table is at `desc_table`, the rings at `avail` and `used`; `tables(nbytes)`
    gives the address of a new indirect table; descriptors are taken from the end of `free`
    (default 0, 1, 2, ...); both indices start at `idx`, written into the rings with flags 0."""

    def __init__(self, ram: FakeRam, size: int, desc_table: int, avail: int, used: int, *,
                 tables: Callable[[int], int], free: list[int] | None = None, idx: int = 0):
        self.ram, self.size = ram, size
        self.desc_table, self.avail, self.used = desc_table, avail, used
        self.tables = tables
        self.free = list(range(size))[::-1] if free is None else list(free)
        self.avail_idx = self.last_used = idx
        self.owned: dict[int, list[int]] = {}
        self.ram.poke(avail, "HH", 0, idx)
        self.ram.poke(used, "HH", 0, idx)

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        """Descriptor i of the queue's table (or of the indirect `table`)."""
        self.ram.poke((self.desc_table if table is None else table) + 16 * i, "QIHH", addr, length, flags, nxt)

    def add(self, bufs, indirect: bool = False) -> int:
        """Make the chain of `bufs` ((gpa, length, device_writable), in order) available, directly
        or through an indirect table, not yet published; returns its head."""
        flags = [VIRTQ_DESC_F_WRITE if w else 0 for _, _, w in bufs]
        if indirect:
            table = self.tables(16 * len(bufs))
            for k, (gpa, length, _) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.desc(k, gpa, length, flags[k] | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else k + 1, table)
            head = self.free.pop()
            self.desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            taken = [head]
        else:
            taken = [self.free.pop() for _ in bufs]
            for k, ((gpa, length, _), i) in enumerate(zip(bufs, taken)):
                last = k == len(bufs) - 1
                self.desc(i, gpa, length, flags[k] | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else taken[k + 1])
            head = taken[0]
        self.owned[head] = taken
        self.ram.poke(self.avail + 4 + 2 * (self.avail_idx % self.size), "H", head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        self.ram.poke(self.avail + 2, "H", self.avail_idx)

    def reap(self) -> list[tuple[int, int]]:
        """The used elements (head, len) since the last reap, their descriptors freed."""
        (idx,) = self.ram.peek(self.used + 2, "H")
        out = []
        while self.last_used != idx:
            head, length = self.ram.peek(self.used + 4 + 8 * (self.last_used % self.size), "II")
            out.append((head, length))
            self.free += self.owned.pop(head)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class Driver:
    """A virtio driver over the registers of `fn` (found through the module's constants: the
    transport's own tests walk the capabilities). Queue q gets MSI-X vector q + 1 and the
    configuration vector 0. `features`: what the driver accepts of what the device offers
    (default all of it)."""

    def __init__(self, fn: V.VirtioPciFunction, ram: FakeRam, *, features: int | None = None):
        self.fn, self.ram = fn, ram
        self.accept = features
        self.rings: dict[int, Ring] = {}
        self.heap = HEAP

    # -- registers ------------------------------------------------------------------------------
    def common(self, offset: int, size: int, value: int | None = None) -> int | None:
        if value is None:
            return self.fn.bar_read(0, V.VIRTIO_BAR, V.COMMON_CFG_OFFSET + offset, size)
        self.fn.bar_write(0, V.VIRTIO_BAR, V.COMMON_CFG_OFFSET + offset, size, value)
        return None

    def config(self, offset: int, size: int) -> int:
        return self.fn.bar_read(0, V.VIRTIO_BAR, V.DEVICE_CFG_OFFSET + offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.fn.bar_write(0, V.VIRTIO_BAR, V.DEVICE_CFG_OFFSET + offset, size, value)

    @property
    def status(self) -> int:
        return self.common(V.VIRTIO_PCI_COMMON_STATUS, 1)

    def offered(self) -> int:
        words = []
        for select in (0, 1):
            self.common(V.VIRTIO_PCI_COMMON_DFSELECT, 4, select)
            words.append(self.common(V.VIRTIO_PCI_COMMON_DF, 4))
        return words[1] << 32 | words[0]

    def reset(self) -> None:
        self.common(V.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        assert self.status == 0
        self.rings.clear()

    def bring_up(self, sizes: dict[int, int] | None = None) -> int:
        """3.1.1 up to DRIVER_OK with every queue (or those of `sizes`, index -> size; default
        each queue's maximum). Returns the negotiated features."""
        self.reset()
        self.common(V.VIRTIO_PCI_COMMON_STATUS, 1, V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
        offered = self.offered()
        features = offered if self.accept is None else offered & (self.accept | 1 << V.VIRTIO_F_VERSION_1)
        for select in (0, 1):
            self.common(V.VIRTIO_PCI_COMMON_GFSELECT, 4, select)
            self.common(V.VIRTIO_PCI_COMMON_GF, 4, features >> 32 * select & 0xFFFF_FFFF)
        self.common(V.VIRTIO_PCI_COMMON_STATUS, 1, self.status | V.VIRTIO_CONFIG_S_FEATURES_OK)
        assert self.status & V.VIRTIO_CONFIG_S_FEATURES_OK
        nq = self.common(V.VIRTIO_PCI_COMMON_NUMQ, 2)
        self._enable_msix(nq + 1)
        self.common(V.VIRTIO_PCI_COMMON_MSIX, 2, 0)
        if sizes is None:
            sizes = {}
            for q in range(nq):
                self.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
                sizes[q] = self.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2)
        for q, size in sizes.items():
            ring = self.rings[q] = self._ring(q, size)
            self.common(V.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
            self.common(V.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
            self.common(V.VIRTIO_PCI_COMMON_Q_MSIX, 2, q + 1)
            for offset, addr in ((V.VIRTIO_PCI_COMMON_Q_DESCLO, ring.desc_table),
                                 (V.VIRTIO_PCI_COMMON_Q_AVAILLO, ring.avail),
                                 (V.VIRTIO_PCI_COMMON_Q_USEDLO, ring.used)):
                self.common(offset, 4, addr & 0xFFFF_FFFF)
                self.common(offset + 4, 4, addr >> 32)
            self.ram.put(ring.desc_table, bytes(ring.used + used_ring_bytes(size) - ring.desc_table))
            self.common(V.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
            assert self.fn.queue(q) is not None
        self.common(V.VIRTIO_PCI_COMMON_STATUS, 1, self.status | V.VIRTIO_CONFIG_S_DRIVER_OK)
        return features

    def _ring(self, q: int, size: int) -> Ring:
        """Queue q's three parts at RINGS + q * RING_STRIDE, indirect tables from the heap."""
        base = RINGS + q * RING_STRIDE
        avail = base + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        assert used + used_ring_bytes(size) <= base + RING_STRIDE
        return Ring(self.ram, size, base, avail, used, tables=self.alloc)

    def _enable_msix(self, vectors: int) -> None:
        msix = self.fn.msix
        for v in range(vectors):
            entry = msix.table_offset + v * M.PCI_MSIX_ENTRY_SIZE
            self.fn.bar_write(0, msix.bar, entry + M.PCI_MSIX_ENTRY_LOWER_ADDR, 4, DOORBELL)
            self.fn.bar_write(0, msix.bar, entry + M.PCI_MSIX_ENTRY_UPPER_ADDR, 4, 0)
            self.fn.bar_write(0, msix.bar, entry + M.PCI_MSIX_ENTRY_DATA, 4, 0x100 + v)
            self.fn.bar_write(0, msix.bar, entry + M.PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)
        self.fn.config.write(msix.cap + M.PCI_MSIX_FLAGS, 2, M.PCI_MSIX_FLAGS_ENABLE)

    # -- buffers --------------------------------------------------------------------------------
    def alloc(self, size: int, fill: int = 0) -> int:
        """`size` bytes of the heap (16-byte aligned), filled with `fill`."""
        gpa = self.heap
        self.heap = (self.heap + max(size, 1) + 15) & ~15
        assert self.heap <= BASE + RAM_SIZE, "the test heap is full"
        self.ram.put(gpa, bytes([fill]) * size)
        return gpa

    def can_submit(self, q: int, n: int = 1) -> bool:
        return len(self.rings[q].free) >= n

    def submit(self, q: int, bufs, *, indirect: bool = False, publish: bool = True) -> int:
        """Make the chain of `bufs` ((gpa, length, device_writable), in order) available on
        queue q, directly or through an indirect table (from the heap); returns its head."""
        head = self.rings[q].add(bufs, indirect)
        if publish:
            self.publish(q)
        return head

    def publish(self, q: int) -> None:
        self.rings[q].publish()

    def kick(self, q: int) -> None:
        """vp_notify: a write of the queue index at the queue's notify address (4.1.5.2)."""
        where = self.fn.notify_address(q)
        self.fn.bar_write(0, where.bar, where.offset, where.size, q)

    def reap(self, q: int) -> list[tuple[int, int]]:
        """The used elements (head, len) since the last reap, their descriptors freed; with
        EVENT_IDX, used_event then asks for an interrupt at the next one (2.7.7.2)."""
        ring = self.rings[q]
        out = ring.reap()
        if self.fn.negotiated(VIRTIO_RING_F_EVENT_IDX):
            self.ram.poke(ring.avail + 4 + 2 * ring.size, "H", ring.last_used)
        return out

    def used_area(self, q: int) -> tuple[int, int]:
        """[start, end) of queue q's used ring (avail_event included): the device writes there."""
        ring = self.rings[q]
        return ring.used, ring.used + used_ring_bytes(ring.size)
