"""A PCI + virtio-pci driver that runs *through the guest*, like kvmits.lab.guest_driver's ITS
driver: the logic is Python on the host, every configuration-space and BAR access is a load or
store a guest vCPU performs (through the guest agent), and the virtqueues live in guest RAM,
written by the host through the guest's own mapping (which no device can tell from a guest
store); the guest then performs the store that publishes them (the queue notify).

So the device models, the PCIe host bridge, KVM_IOEVENTFD and the MSI-X irqfd routes see what
a guest driver makes them see, and a test can also make them see what no sane driver would.

The steps are those of PCI 3.0 chapter 6 (configuration space, BAR sizing 6.2.5.1, MSI-X 6.8.2)
and virtio 1.2 (3.1.1 device initialization, 4.1.4 capabilities, 4.1.5 the PCI-specific
initialization, 2.7 split virtqueues).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kvmits.lab.guest_driver import DriverError, GuestAccess, GuestHeap
from kvmits.machine.devices.virtio.pci import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                                               VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
                                               VIRTIO_F_VERSION_1, VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_CAP_CFG_TYPE,
                                               VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG,
                                               VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_LENGTH,
                                               VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_OFFSET,
                                               VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_DFSELECT,
                                               VIRTIO_PCI_COMMON_GF, VIRTIO_PCI_COMMON_GFSELECT,
                                               VIRTIO_PCI_COMMON_MSIX, VIRTIO_PCI_COMMON_Q_AVAILLO,
                                               VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_ENABLE,
                                               VIRTIO_PCI_COMMON_Q_MSIX, VIRTIO_PCI_COMMON_Q_NOFF,
                                               VIRTIO_PCI_COMMON_Q_SELECT, VIRTIO_PCI_COMMON_Q_SIZE,
                                               VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_STATUS,
                                               VIRTIO_PCI_NOTIFY_CAP_MULT)
from kvmits.machine.devices.virtio.virtqueue import (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, avail_ring_bytes,
                                                     desc_table_bytes, used_ring_bytes)
from kvmits.machine.pci.config import (PCI_BASE_ADDRESS_0, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAP_LIST_NEXT,
                                       PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
                                       PCI_DEVICE_ID, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_VENDOR_ID)
from kvmits.machine.pci.host import ECAM_FUNCTION_SHIFT
from kvmits.machine.pci.msix import (PCI_MSIX_BIR, PCI_MSIX_ENTRY_CTRL_MASKBIT, PCI_MSIX_ENTRY_DATA,
                                     PCI_MSIX_ENTRY_LOWER_ADDR, PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_UPPER_ADDR,
                                     PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE,
                                     PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_FLAGS_QSIZE, PCI_MSIX_PBA, PCI_MSIX_TABLE)

#: a capability list longer than this is a loop (48 = (256 - 64) / 4, the most that fit)
MAX_CAPS = 48


class GuestPciFunction:
    """One function of bus 0 behind the ECAM window at `ecam` (guest-physical), reached by the
    guest's loads and stores."""

    def __init__(self, access: GuestAccess, ecam: int, devfn: int):
        self.access = access
        self.devfn = devfn
        self.base = ecam + (devfn << ECAM_FUNCTION_SHIFT)

    def read(self, offset: int, width: int = 4) -> int:
        return self.access.read(self.base + offset, width)

    def write(self, offset: int, value: int, width: int = 4) -> None:
        self.access.write(self.base + offset, width, value)

    @property
    def present(self) -> bool:
        return self.read(PCI_VENDOR_ID, 2) != 0xFFFF           # a master abort reads all ones

    def ids(self) -> tuple[int, int]:
        return self.read(PCI_VENDOR_ID, 2), self.read(PCI_DEVICE_ID, 2)

    def bar_size(self, index: int) -> int:
        """BAR sizing (6.2.5.1): write all ones, read the mask back, restore."""
        at = PCI_BASE_ADDRESS_0 + 4 * index
        old = self.read(at)
        self.write(at, 0xFFFF_FFFF)
        mask = self.read(at) & ~0xF
        self.write(at, old)
        return (~mask + 1) & 0xFFFF_FFFF if mask else 0

    def place_bar(self, index: int, address: int) -> None:
        self.write(PCI_BASE_ADDRESS_0 + 4 * index, address)

    def bar(self, index: int) -> int:
        return self.read(PCI_BASE_ADDRESS_0 + 4 * index) & ~0xF

    def enable(self, memory: bool = True, master: bool = True) -> None:
        self.write(PCI_COMMAND, (PCI_COMMAND_MEMORY if memory else 0) | (PCI_COMMAND_MASTER if master else 0), 2)

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, capability ID) in list order, walked by the guest."""
        if not self.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return []
        out, at = [], self.read(PCI_CAPABILITY_LIST, 1) & ~3
        while at and len(out) < MAX_CAPS:
            out.append((at, self.read(at, 1)))
            at = self.read(at + PCI_CAP_LIST_NEXT, 1) & ~3
        if at:
            raise DriverError(f"function {self.devfn:#x}: capability list does not end")
        return out


class GuestMsix:
    """The MSI-X capability at `cap` of `fn`, its table and PBA in the BARs where `fn` now
    has them (6.8.2)."""

    def __init__(self, fn: GuestPciFunction, cap: int):
        self.fn = fn
        self.cap = cap
        self.vectors = (fn.read(cap + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_QSIZE) + 1
        table, pba = fn.read(cap + PCI_MSIX_TABLE), fn.read(cap + PCI_MSIX_PBA)
        self.table = fn.bar(table & PCI_MSIX_BIR) + (table & ~PCI_MSIX_BIR)
        self.pba = fn.bar(pba & PCI_MSIX_BIR) + (pba & ~PCI_MSIX_BIR)

    def control(self, enable: bool = True, mask_all: bool = False) -> None:
        self.fn.write(self.cap + PCI_MSIX_FLAGS,
                      (PCI_MSIX_FLAGS_ENABLE if enable else 0) | (PCI_MSIX_FLAGS_MASKALL if mask_all else 0), 2)

    def set_vector(self, vector: int, address: int, data: int, masked: bool = False) -> None:
        """Mask, write the message, unmask (unless `masked`): what Linux does."""
        entry = self.table + vector * PCI_MSIX_ENTRY_SIZE
        access = self.fn.access
        access.write(entry + PCI_MSIX_ENTRY_VECTOR_CTRL, 4, PCI_MSIX_ENTRY_CTRL_MASKBIT)
        access.write(entry + PCI_MSIX_ENTRY_LOWER_ADDR, 4, address & 0xFFFF_FFFF)
        access.write(entry + PCI_MSIX_ENTRY_UPPER_ADDR, 4, address >> 32)
        access.write(entry + PCI_MSIX_ENTRY_DATA, 4, data)
        if not masked:
            self.mask(vector, False)

    def mask(self, vector: int, masked: bool = True) -> None:
        self.fn.access.write(self.table + vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4,
                             PCI_MSIX_ENTRY_CTRL_MASKBIT if masked else 0)

    def pending(self, vector: int) -> bool:
        return bool(self.fn.access.read(self.pba + vector // 64 * 8, 8) >> (vector % 64) & 1)


class Structure(NamedTuple):
    """Where a virtio structure is, guest-physical (from its capability and its BAR)."""

    address: int
    length: int


class GuestQueue:
    """A split virtqueue the host lays out in guest RAM for the guest's driver (2.7)."""

    def __init__(self, ram, heap: GuestHeap, index: int, size: int):
        self.ram = ram
        self.index = index
        self.size = size
        self.desc = heap.alloc(desc_table_bytes(size), 16)
        self.avail = heap.alloc(avail_ring_bytes(size), 2)
        self.used = heap.alloc(used_ring_bytes(size), 4)
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain `buffers` ((address, length, device-writable)) in the next free descriptors and
        make the chain available; returns its head. (The notify is the guest's: GuestVirtio.)"""
        head = self.next_desc
        for i, (addr, length, writable) in enumerate(buffers):
            n = (head + i) % self.size
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            self.ram.write(self.desc + 16 * n, struct.pack("<QIHH", addr, length, flags, (n + 1) % self.size))
        self.next_desc = (head + len(buffers)) % self.size
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))     # after the ring entry
        return head

    def write_desc(self, n: int, addr: int, length: int, flags: int, next_: int) -> None:
        """One raw descriptor, for chains no driver would make."""
        self.ram.write(self.desc + 16 * n, struct.pack("<QIHH", addr, length, flags, next_))

    def make_available(self, head: int) -> None:
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of each chain the device used since the last call."""
        used_idx, = struct.unpack("<H", self.ram.read(self.used + 2, 2))
        out = []
        while self.used_seen != used_idx:
            out.append(struct.unpack("<II", self.ram.read(self.used + 4 + 8 * (self.used_seen % self.size), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class GuestVirtio:
    """A virtio-pci modern driver for the function `fn` (its BARs placed, memory enabled)."""

    def __init__(self, fn: GuestPciFunction, ram, heap: GuestHeap):
        self.fn = fn
        self.ram = ram
        self.heap = heap
        self.structures: dict[int, Structure] = {}
        self.msix: GuestMsix | None = None
        self.notify_multiplier = 0
        for at, cap_id in fn.capabilities():
            if cap_id == PCI_CAP_ID_MSIX:
                self.msix = GuestMsix(fn, at)
            if cap_id != PCI_CAP_ID_VNDR:
                continue
            cfg_type = fn.read(at + VIRTIO_PCI_CAP_CFG_TYPE, 1)
            if cfg_type in self.structures or cfg_type not in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG,
                                                               VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_DEVICE_CFG):
                continue                               # 4.1.4: the first of each type is the one to use
            bar = fn.read(at + VIRTIO_PCI_CAP_BAR, 1)
            self.structures[cfg_type] = Structure(fn.bar(bar) + fn.read(at + VIRTIO_PCI_CAP_OFFSET),
                                                  fn.read(at + VIRTIO_PCI_CAP_LENGTH))
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                self.notify_multiplier = fn.read(at + VIRTIO_PCI_NOTIFY_CAP_MULT)
        for needed in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG):
            if needed not in self.structures:
                raise DriverError(f"function {fn.devfn:#x} lacks virtio capability {needed}")
        self.common = self.structures[VIRTIO_PCI_CAP_COMMON_CFG].address
        self.queues: dict[int, GuestQueue] = {}

    def read(self, offset: int, width: int) -> int:
        return self.fn.access.read(self.common + offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        self.fn.access.write(self.common + offset, width, value)

    @property
    def status(self) -> int:
        return self.read(VIRTIO_PCI_COMMON_STATUS, 1)

    def device_features(self) -> int:
        out = 0
        for sel in (0, 1):
            self.write(VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
            out |= self.read(VIRTIO_PCI_COMMON_DF, 4) << 32 * sel
        return out

    def initialize(self, features: int = 0) -> int:
        """3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features (`features` & offered, plus
        VERSION_1), FEATURES_OK, checked. Returns the accepted features."""
        self.write(VIRTIO_PCI_COMMON_STATUS, 1, 0)
        self.write(VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.write(VIRTIO_PCI_COMMON_STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        accepted = (features | 1 << VIRTIO_F_VERSION_1) & self.device_features()
        for sel in (0, 1):
            self.write(VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            self.write(VIRTIO_PCI_COMMON_GF, 4, accepted >> 32 * sel & 0xFFFF_FFFF)
        status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK
        self.write(VIRTIO_PCI_COMMON_STATUS, 1, status)
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            raise DriverError(f"function {self.fn.devfn:#x} refused features {accepted:#x}")
        return accepted

    def setup_queue(self, index: int, size: int, vector: int) -> GuestQueue:
        """4.1.5.1.3: select, size, MSI-X vector (checked, 4.1.5.1.2), the three addresses, enable."""
        q = GuestQueue(self.ram, self.heap, index, size)
        self.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        self.write(VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        self.write(VIRTIO_PCI_COMMON_Q_MSIX, 2, vector)
        if self.read(VIRTIO_PCI_COMMON_Q_MSIX, 2) != vector:
            raise DriverError(f"queue {index}: MSI-X vector {vector} not taken")
        for offset, addr in ((VIRTIO_PCI_COMMON_Q_DESCLO, q.desc), (VIRTIO_PCI_COMMON_Q_AVAILLO, q.avail),
                             (VIRTIO_PCI_COMMON_Q_USEDLO, q.used)):
            self.write(offset, 4, addr & 0xFFFF_FFFF)
            self.write(offset + 4, 4, addr >> 32)
        self.write(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        self.queues[index] = q
        return q

    def set_config_vector(self, vector: int) -> None:
        self.write(VIRTIO_PCI_COMMON_MSIX, 2, vector)

    def driver_ok(self) -> None:
        self.write(VIRTIO_PCI_COMMON_STATUS, 1, self.status | VIRTIO_CONFIG_S_DRIVER_OK)

    def notify_address(self, index: int) -> int:
        self.write(VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        off = self.read(VIRTIO_PCI_COMMON_Q_NOFF, 2)
        return self.structures[VIRTIO_PCI_CAP_NOTIFY_CFG].address + off * self.notify_multiplier

    def notify(self, index: int, address: int | None = None) -> None:
        """The guest's 2-byte write of the queue index to its notify address (4.1.5.2)."""
        self.fn.access.write(self.notify_address(index) if address is None else address, 2, index)
