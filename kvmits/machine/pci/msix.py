"""MSI-X (PCI Local Bus Specification 3.0, 6.8.2): the capability, the vector table and the
Pending Bit Array, for one function.

The capability's Message Control holds the table size (N - 1, read-only), Function Mask and
MSI-X Enable; Table and PBA Offset/BIR say where in a BAR the table (16 bytes per vector:
Message Address, Message Upper Address, Message Data, Vector Control) and the PBA (one bit per
vector, read-only) are. Every vector starts masked (6.8.2.9).

`signal(vector)` is the device raising an interrupt. Delivered only while MSI-X is enabled and
neither the function nor the vector is masked; otherwise its pending bit is set, and it is sent
when the mask goes (6.8.2.9: "the function must send the message ... after the vector is
unmasked"). An irqfd alone cannot do this -- KVM would inject whatever the mask says -- so the
device calls signal() and the sink's fire() writes the irqfd only for an unmasked vector.

The sink learns a vector's message when it matters to routing: `route(vector, address, data)`
whenever an unmasked vector's message may have changed (a table write, an unmask, MSI-X Enable),
before any fire() with it, so a VMM programs the vector's KVM MSI route there.

A guest is hostile: table accesses of any width at any offset are taken byte by byte (the
spec allows DWORD and aligned QWORD accesses; others are undefined, here harmless); reserved
Vector Control bits read as zero; PBA writes are ignored; nothing raises.
"""

from __future__ import annotations

import struct
from typing import Protocol

from kvmits.machine.pci.config import PCI_CAP_ID_MSIX, ConfigSpace
from kvmits.machine.saved_state import StateChecker

PCI_MSIX_FLAGS = 2                     # Message Control, from the capability's start
PCI_MSIX_FLAGS_QSIZE = 0x07FF          # table size - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000        # Function Mask
PCI_MSIX_FLAGS_ENABLE = 0x8000         # MSI-X Enable
PCI_MSIX_TABLE = 4                     # Table Offset/Table BIR
PCI_MSIX_PBA = 8                       # PBA Offset/PBA BIR
PCI_MSIX_BIR = 0x7
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1
MAX_VECTORS = 2048                     # the 11-bit table size field

_CHECK = StateChecker("MSI-X")


class MsixSink(Protocol):
    """Where a function's MSI-X messages go (a VMM: KVM MSI routes and irqfds)."""

    def route(self, vector: int, address: int, data: int) -> None: ...

    def fire(self, vector: int) -> None: ...


class Msix:
    """MSI-X of one function: adds the capability to `config`; the table at `table_offset` and
    the PBA at `pba_offset` of BAR `bar` (8-byte aligned, the PBA after the table; the function
    serves that BAR's accesses to those ranges through table_read/table_write)."""

    def __init__(self, config: ConfigSpace, vectors: int, bar: int, table_offset: int, pba_offset: int,
                 sink: MsixSink):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X has 1..{MAX_VECTORS} vectors, not {vectors}")
        if bar not in config.bars:
            raise ValueError(f"BAR {bar} is not implemented by this function")
        if table_offset % 8 or pba_offset % 8 or pba_offset < table_offset + vectors * PCI_MSIX_ENTRY_SIZE:
            raise ValueError("the table and PBA must be 8-byte aligned, the PBA after the table")
        if pba_offset + self.pba_size_for(vectors) > config.bars[bar].size:
            raise ValueError(f"the MSI-X table and PBA do not fit in BAR {bar}")
        self.config = config
        self.vectors = vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.sink = sink
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        wmask = struct.pack("<HII", PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE, 0, 0)
        self.cap = config.add_capability(PCI_CAP_ID_MSIX, body, wmask)
        self.table = bytearray(vectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(vectors):
            self.table[v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pending = bytearray((vectors + 7) // 8)
        self._live = False          # MSI-X enabled and the function unmasked, as last seen
        #: signals latched while masked, and those sent on unmask
        self.latched = 0
        self.replayed = 0
        config.watch(self.cap + PCI_MSIX_FLAGS, 2, self.control_written)

    @staticmethod
    def pba_size_for(vectors: int) -> int:
        return (vectors + 63) // 64 * 8           # QWORDs (6.8.2.7)

    # -- state --------------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.config.read(self.cap + PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & PCI_MSIX_FLAGS_ENABLE)

    def masked(self, vector: int) -> bool:
        return bool(self.table[vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def message(self, vector: int) -> tuple[int, int]:
        """(address, data) of `vector`'s table entry."""
        lo, hi, data, _ = struct.unpack_from("<IIII", self.table, vector * PCI_MSIX_ENTRY_SIZE)
        return hi << 32 | lo, data

    def is_pending(self, vector: int) -> bool:
        return bool(self.pending[vector >> 3] >> (vector & 7) & 1)

    def _deliverable(self, vector: int) -> bool:
        return self._live and not self.masked(vector)

    # -- save and restore (issue 13) -------------------------------------------------------------
    def save_state(self) -> dict:
        """The vector table and the PBA (hex) and the counters; Message Control is in config space."""
        return {"table": bytes(self.table).hex(), "pending": bytes(self.pending).hex(),
                "latched": self.latched, "replayed": self.replayed}

    def load_state(self, saved) -> None:
        """Apply a save_state() dict after the config space (Message Control) was restored:
        every field checked first (ValueError naming it; nothing changes), then the table and
        the PBA, and, if MSI-X is enabled and the function unmasked, each unmasked vector is
        routed again (sink.route: the new VM's MSI routes) and one pending there is sent, as
        an unmask would (a consistent state has none: it was sent when it was latched)."""
        table, pending, latched, replayed = self.check_state(saved)
        self.table[:] = table
        self.pending[:] = pending
        self.latched, self.replayed = latched, replayed
        self._live = False
        self.control_written()

    def check_state(self, saved) -> tuple[bytes, bytes, int, int]:
        """The fields of a save_state() dict for this function's vector count, checked
        (ValueError naming the first bad one): (table, pending, latched, replayed)."""
        _CHECK.fields(saved, ("table", "pending", "latched", "replayed"), None)
        table = _CHECK.hex(saved["table"], "table", len(self.table))
        pending = _CHECK.hex(saved["pending"], "pending", len(self.pending))
        for v in range(self.vectors):
            at = v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
            _CHECK.int(int.from_bytes(table[at:at + 4], "little"), f"table[{v}] Vector Control", 1 << 32,
                       PCI_MSIX_ENTRY_CTRL_MASKBIT)     # the other bits are reserved (6.8.2.9)
        _CHECK.int(int.from_bytes(pending, "little"), "pending", 1 << self.vectors)     # no bit past the last vector
        return table, pending, _CHECK.int(saved["latched"], "latched", 1 << 64), \
            _CHECK.int(saved["replayed"], "replayed", 1 << 64)

    # -- the device side ------------------------------------------------------------------------
    def signal(self, vector: int) -> bool:
        """The function raises `vector`: True if sent, False if latched in the PBA (or no such
        vector: a device model bug, ignored)."""
        if not 0 <= vector < self.vectors:
            return False
        if self._deliverable(vector):
            self.sink.fire(vector)
            return True
        self.pending[vector >> 3] |= 1 << (vector & 7)
        self.latched += 1
        return False

    # -- guest accesses to the table and the PBA (never raise) ------------------------------------
    def claims(self, offset: int) -> bool:
        """Is BAR offset `offset` in the table or the PBA?"""
        return (self.table_offset <= offset < self.table_offset + len(self.table)
                or self.pba_offset <= offset < self.pba_offset + self.pba_size_for(self.vectors))

    def bar_read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def _read_byte(self, offset: int) -> int:
        t = offset - self.table_offset
        if 0 <= t < len(self.table):
            return self.table[t]
        p = offset - self.pba_offset
        if 0 <= p < len(self.pending):
            return self.pending[p]
        return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        touched = set()
        for i in range(size):
            t = offset + i - self.table_offset
            if not 0 <= t < len(self.table):
                continue                              # PBA and beyond: read-only
            byte = (value >> (8 * i)) & 0xFF
            if t % PCI_MSIX_ENTRY_SIZE == PCI_MSIX_ENTRY_VECTOR_CTRL:
                byte &= PCI_MSIX_ENTRY_CTRL_MASKBIT   # the other Vector Control bits are reserved
            elif t % PCI_MSIX_ENTRY_SIZE > PCI_MSIX_ENTRY_VECTOR_CTRL:
                continue
            self.table[t] = byte
            touched.add(t // PCI_MSIX_ENTRY_SIZE)
        for vector in sorted(touched):
            self._vector_changed(vector)

    def control_written(self) -> None:
        """Message Control changed (a config write; ConfigSpace.watch): on enable or function
        unmask, route the unmasked vectors and send what is pending."""
        live = self.enabled and not self.control & PCI_MSIX_FLAGS_MASKALL
        if live == self._live:
            return
        self._live = live
        if live:
            for vector in range(self.vectors):
                self._vector_changed(vector)

    def _vector_changed(self, vector: int) -> None:
        if not self._deliverable(vector):
            return
        self.sink.route(vector, *self.message(vector))
        if self.is_pending(vector):
            self.pending[vector >> 3] &= ~(1 << (vector & 7))
            self.replayed += 1
            self.sink.fire(vector)

