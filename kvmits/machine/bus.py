"""Dispatch of KVM_EXIT_MMIO to device models by guest-physical address range.

This is the hot path of every userspace-emulated access: a lookup is one bisect over a sorted
list of bases and one comparison; the device's bound methods are stored at registration, so a
dispatch allocates nothing and builds no dict.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from typing import Protocol

log = logging.getLogger(__name__)


class MmioDevice(Protocol):
    """What a device model implements to sit on the bus. Offsets are relative to the base the
    device was added at; `vcpu` is the index of the vCPU whose access exited; `size` is 1, 2, 4
    or 8 bytes and `value` is little-endian. Guest input must never raise out of these."""

    def mmio_read(self, vcpu: int, offset: int, size: int) -> int: ...

    def mmio_write(self, vcpu: int, offset: int, size: int, value: int) -> None: ...


class MmioBus:
    """Device models by address range; unclaimed accesses are logged once per address and read as 0."""

    def __init__(self):
        # (bases, ends, reads, writes): parallel lists sorted by base, published as one tuple so a
        # vCPU thread never sees half of an update
        self._table: tuple[list, list, list, list] = ([], [], [], [])
        self._entries: list[tuple[int, int, str, MmioDevice]] = []
        self._lock = threading.Lock()          # only for registration and the unclaimed log
        self._unclaimed_seen: set[int] = set()
        #: how many accesses hit no device (reads and writes)
        self.unclaimed_count = 0

    def add(self, base: int, size: int, device: MmioDevice, name: str | None = None) -> None:
        """Claim [base, base + size) for `device`. Overlapping ranges are refused.

        Not meant to be called while vCPUs run: the tables are swapped in one step, but a
        device added concurrently may miss accesses that raced with it."""
        if size <= 0:
            raise ValueError(f"device size must be positive, not {size}")
        end = base + size
        name = name or type(device).__name__
        with self._lock:
            for b, e, n, _ in self._entries:
                if base < e and b < end:
                    raise ValueError(f"{name} [{base:#x}, {end:#x}) overlaps {n} [{b:#x}, {e:#x})")
            self._publish(sorted(self._entries + [(base, end, name, device)], key=lambda t: t[0]))

    def remove(self, device: MmioDevice) -> None:
        with self._lock:
            entries = [t for t in self._entries if t[3] is not device]
            if len(entries) == len(self._entries):
                raise ValueError(f"{device!r} is not on the bus")
            self._publish(entries)

    def replace(self, old: MmioDevice, new: MmioDevice) -> None:
        """Put `new` where `old` is (same range and name), in one step: safe while vCPUs run
        (an access either reaches the old device or the new one)."""
        with self._lock:
            if not any(t[3] is old for t in self._entries):
                raise ValueError(f"{old!r} is not on the bus")
            self._publish([(b, e, n, new if d is old else d) for b, e, n, d in self._entries])

    def _publish(self, entries) -> None:
        self._entries = entries
        self._table = ([t[0] for t in entries], [t[1] for t in entries],
                       [t[3].mmio_read for t in entries], [t[3].mmio_write for t in entries])

    def devices(self) -> list[tuple[int, int, str, MmioDevice]]:
        """(base, end, name, device), sorted by base."""
        return list(self._entries)

    def find(self, gpa: int) -> tuple[int, MmioDevice] | None:
        """(base, device) claiming `gpa`, or None."""
        entries = self._entries
        for base, end, _name, device in entries:
            if base <= gpa < end:
                return base, device
        return None

    # -- the hot path ----------------------------------------------------------------------------
    def read(self, vcpu: int, gpa: int, size: int) -> int:
        bases, ends, reads, _ = self._table
        i = bisect_right(bases, gpa) - 1
        if i >= 0 and gpa < ends[i]:
            return reads[i](vcpu, gpa - bases[i], size)
        self._unclaimed(vcpu, gpa, size, False, 0)
        return 0

    def write(self, vcpu: int, gpa: int, size: int, value: int) -> None:
        bases, ends, _, writes = self._table
        i = bisect_right(bases, gpa) - 1
        if i >= 0 and gpa < ends[i]:
            writes[i](vcpu, gpa - bases[i], size, value)
            return
        self._unclaimed(vcpu, gpa, size, True, value)

    # -- unclaimed accesses ----------------------------------------------------------------------
    def _unclaimed(self, vcpu: int, gpa: int, size: int, is_write: bool, value: int) -> None:
        self.unclaimed_count += 1
        if gpa in self._unclaimed_seen:
            return
        with self._lock:
            if gpa in self._unclaimed_seen:
                return
            self._unclaimed_seen.add(gpa)
        if is_write:
            log.warning("vCPU %d: unclaimed MMIO write of %d bytes at %#x (value %#x): ignored; "
                        "further accesses to this address are not logged", vcpu, size, gpa, value)
        else:
            log.warning("vCPU %d: unclaimed MMIO read of %d bytes at %#x: reads as 0; "
                        "further accesses to this address are not logged", vcpu, size, gpa)

    def unclaimed_addresses(self) -> frozenset[int]:
        """Every address an unclaimed access went to (each was logged once)."""
        return frozenset(self._unclaimed_seen)
