"""A PCI function's configuration space: the type 0 header, BARs and the capability list.

Names are those of the PCI Local Bus Specification 3.0 (chapter 6, "Configuration Space") and
of Linux's include/uapi/linux/pci_regs.h, which uses them. A PCI Express function has 4 KiB of
configuration space (PCIe Base 4.0, 7.2.2): the first 256 bytes are the PCI-compatible header
and capabilities, the rest extended capabilities (none here: they read as zero).

The rules that make config space safe against any guest access:
- every byte has a write mask: a write changes only the writable bits, so read-only fields
  (IDs, class, header type, capability pointers) and the low bits of a BAR stay what the device
  says, whatever the guest writes, at any width and any offset;
- BAR sizing (6.2.5.1) needs no special case: the bits of a BAR below its size are read-only
  zero, so a write of all ones reads back as the size mask with the type bits;
- PCI_STATUS's error bits are write-one-to-clear (6.2.3); this device model never sets them,
  so the mask keeps them zero;
- accesses are whatever the guest makes them: 1, 2 or 4 bytes (8 split by the host bridge),
  aligned or not; bytes past the 4 KiB read as all ones and take no writes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from kvmits.machine.saved_state import StateChecker

CONFIG_SPACE_SIZE = 4096        # PCIe Base 4.0, 7.2.2 (ECAM: 4 KiB per function)
PCI_STD_HEADER_SIZEOF = 64      # the type 0 header; capabilities start at 0x40 or later

# Type 0 header (PCI 3.0, 6.1, figure 6-1)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2         # memory space enable: BARs decode only with it set
PCI_COMMAND_MASTER = 0x4         # bus master enable: the function may DMA and send MSIs
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10       # PCI_CAPABILITY_LIST is valid
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A          # base class and sub-class, 16 bits
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_NORMAL = 0
PCI_BASE_ADDRESS_0 = 0x10
PCI_NUM_BARS = 6
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

# Capability IDs (PCI Code and ID Assignment Specification, 2)
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_LIST_NEXT = 1            # offset of the next pointer in every capability

_CHECK = StateChecker("PCI config space")

#: The smallest memory BAR kvmits gives a function: one 4 KiB page, so a BAR never shares a
#: page with another device and each can be a separate KVM memory slot or bus entry.
MIN_BAR_SIZE = 0x1000


@dataclass(frozen=True)
class Bar:
    """A memory BAR the function implements: its size (a power of two >= MIN_BAR_SIZE) and type."""

    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self):
        if not 0 <= self.index < PCI_NUM_BARS or (self.is_64bit and self.index == PCI_NUM_BARS - 1):
            raise ValueError(f"BAR {self.index}{' (64-bit)' if self.is_64bit else ''} does not fit the header")
        if self.size < MIN_BAR_SIZE or self.size & (self.size - 1):
            raise ValueError(f"BAR size must be a power of two >= {MIN_BAR_SIZE:#x}, not {self.size:#x}")
        if not self.is_64bit and self.size > 1 << 31:
            raise ValueError("a 32-bit BAR holds at most 2 GiB")

    @property
    def flags(self) -> int:
        return ((PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64bit else 0)
                | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0))


class ConfigSpace:
    """4 KiB of configuration space with per-byte write masks.

    `watch(offset, size, fn)`: fn() is called after every write that changed a byte of that
    range, e.g. the host bridge on PCI_COMMAND and the BARs (to map, move or unmap BARs), MSI-X
    on its Message Control."""

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem: int = 0, bars: tuple[Bar, ...] = ()):
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars = {b.index: b for b in bars}
        self._watches: list[tuple[int, int, Callable[[], None]]] = []
        self._cap_end = PCI_STD_HEADER_SIZEOF
        self._last_cap = None
        self._set(PCI_VENDOR_ID, 2, vendor)
        self._set(PCI_DEVICE_ID, 2, device)
        self._set(PCI_REVISION_ID, 1, revision)
        self._set(PCI_CLASS_PROG, 3, class_code)          # prog-if, sub-class, base class
        self._set(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_NORMAL)
        self._set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._set(PCI_SUBSYSTEM_ID, 2, subsystem)
        self._set(PCI_COMMAND, 2, 0, wmask=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        self._set(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)  # scratch for software (6.2.4)
        taken = set()
        for bar in bars:
            slots = (bar.index, bar.index + 1) if bar.is_64bit else (bar.index,)
            if taken & set(slots):
                raise ValueError(f"BAR {bar.index} overlaps another BAR's register")
            taken |= set(slots)
            offset = PCI_BASE_ADDRESS_0 + 4 * bar.index
            self._set(offset, 4, bar.flags, wmask=~(bar.size - 1) & 0xFFFF_FFF0)
            if bar.is_64bit:
                self._set(offset + 4, 4, 0, wmask=~((bar.size - 1) >> 32) & 0xFFFF_FFFF)

    def _set(self, offset: int, size: int, value: int, wmask: int = 0) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")

    def watch(self, offset: int, size: int, fn: Callable[[], None]) -> None:
        self._watches.append((offset, offset + size, fn))

    # -- capabilities ---------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability: `body` is everything after the ID and next pointer, `wmask` its
        writable bits (default: none). Returns its offset. Capabilities are DWORD-aligned in the
        first 256 bytes (PCI 3.0, 6.7), chained from PCI_CAPABILITY_LIST."""
        length = 2 + len(body)
        offset = (self._cap_end + 3) & ~3
        if offset + length > 256:
            raise ValueError(f"capability {cap_id:#x} ({length} bytes) does not fit below 256 bytes")
        if wmask is not None and len(wmask) != len(body):
            raise ValueError("wmask must be as long as the body")
        self.data[offset] = cap_id
        self.data[offset + PCI_CAP_LIST_NEXT] = 0
        self.data[offset + 2:offset + length] = body
        if wmask is not None:
            self.wmask[offset + 2:offset + length] = wmask
        if self._last_cap is None:
            self.data[PCI_CAPABILITY_LIST] = offset
            self._set(PCI_STATUS, 2, int.from_bytes(self.data[PCI_STATUS:PCI_STATUS + 2], "little")
                      | PCI_STATUS_CAP_LIST)
        else:
            self.data[self._last_cap + PCI_CAP_LIST_NEXT] = offset
        self._last_cap = offset
        self._cap_end = offset + length
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, ID) of each capability in chain order, as software walks it (bounded)."""
        out, offset, seen = [], self.data[PCI_CAPABILITY_LIST] & ~3, set()
        while offset and offset not in seen and len(out) < 48:
            seen.add(offset)
            out.append((offset, self.data[offset]))
            offset = self.data[offset + PCI_CAP_LIST_NEXT] & ~3
        return out

    # -- what the device and the host bridge read --------------------------------------------------
    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.data, PCI_COMMAND)[0]

    def bar_address(self, index: int) -> int:
        """The address software programmed into BAR `index` (0 until it does)."""
        bar = self.bars[index]
        offset = PCI_BASE_ADDRESS_0 + 4 * index
        low = struct.unpack_from("<I", self.data, offset)[0] & ~0xF
        if not bar.is_64bit:
            return low
        return low | struct.unpack_from("<I", self.data, offset + 4)[0] << 32

    # -- save and restore (issue 13) ----------------------------------------------------------------
    def save_state(self) -> str:
        """The 4 KiB as hex: what software wrote (and the read-only bytes, which load_state checks)."""
        return bytes(self.data).hex()

    def load_state(self, saved) -> None:
        """Take the writable bits of a save_state() string (check_state first: nothing changes
        if it fails), without calling the watches: the caller brings the users of the registers
        up to date (PciHost.reload, Msix.load_state)."""
        data = self.check_state(saved)
        self.data[:] = bytes((old & ~mask | new & mask) & 0xFF for old, new, mask in zip(self.data, data, self.wmask))

    def check_state(self, saved) -> bytes:
        """A save_state() string, checked: 4 KiB of hex whose read-only bytes are this
        function's own (a different device, with other IDs, BAR types or capabilities, is
        refused: ValueError naming the first byte that differs)."""
        data = _CHECK.hex(saved, "config", CONFIG_SPACE_SIZE)
        for i, (old, new, mask) in enumerate(zip(self.data, data, self.wmask)):
            if (old ^ new) & ~mask & 0xFF:
                raise _CHECK.error(f"byte {i:#x} is read-only here: saved {new:#04x}, this function "
                                   f"has {old:#04x} (not the same device)")
        return data

    # -- guest accesses (through the host bridge: never raise) -------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or size <= 0:
            return (1 << (8 * max(size, 0))) - 1
        end = min(offset + size, CONFIG_SPACE_SIZE)
        value = int.from_bytes(self.data[offset:end], "little") if offset < end else 0
        missing = offset + size - max(end, offset)          # bytes past the end read as ones
        if missing:
            value |= ((1 << (8 * missing)) - 1) << (8 * (size - missing))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or size <= 0:
            return
        end = min(offset + size, CONFIG_SPACE_SIZE)
        first = last = -1
        data, wmask = self.data, self.wmask
        for i in range(offset, end):
            mask = wmask[i]
            if not mask:
                continue
            byte = (value >> (8 * (i - offset))) & 0xFF
            new = (data[i] & ~mask) | (byte & mask)
            if new != data[i]:
                data[i] = new
                if first < 0:
                    first = i
                last = i
        if first >= 0:
            for start, stop, fn in self._watches:
                if first < stop and start <= last:
                    fn()
