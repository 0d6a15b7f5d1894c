"""Guest RAM: anonymous mappings that a VM maps at a guest-physical address."""

from __future__ import annotations

import mmap
import struct

from kvmits import uapi
from kvmits.errors import GuestMemoryError
from kvmits.kvm._ioctl import address_of

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """`size` bytes of anonymous memory meant for guest-physical address `gpa`.

    Host code reads and writes it by guest-physical address; every access is bounds-checked
    and raises GuestMemoryError outside [gpa, gpa + size). This is the guest-memory interface
    the userspace ITS model uses (read/write); the u32/u64 helpers are conveniences.
    """

    def __init__(self, gpa: int, size: int):
        if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
            raise ValueError(f"guest memory must be page-aligned and non-empty: gpa={gpa:#x} size={size:#x}")
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self._map = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._cbuf = uapi.ffi.from_buffer(self._map)
        #: host virtual address of the mapping (kvm_userspace_memory_region.userspace_addr)
        self.host_addr = address_of(self._cbuf)
        self.view = memoryview(self._map)

    # -- the guest-memory interface ---------------------------------------------------------
    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end and size >= 0

    def _offset(self, gpa: int, size: int) -> int:
        if not (self.gpa <= gpa and gpa + size <= self.end and size >= 0):
            raise GuestMemoryError(gpa, size)
        return gpa - self.gpa

    def read(self, gpa: int, size: int) -> bytes:
        off = self._offset(gpa, size)
        return self._map[off:off + size]

    def write(self, gpa: int, data: bytes) -> None:
        off = self._offset(gpa, len(data))
        self._map[off:off + len(data)] = data

    # -- conveniences -------------------------------------------------------------------------
    def read_u32(self, gpa: int) -> int:
        return _U32.unpack_from(self._map, self._offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack_from(self._map, self._offset(gpa, 8))[0]

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self._map, self._offset(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self._map, self._offset(gpa, 8), value)

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        off = self._offset(gpa, size)
        self._map[off:off + size] = bytes([byte]) * size

    # -- lifetime ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._map.closed

    def close(self) -> None:
        """Unmap. The VM must no longer map it (Vm.remove_memory, or the VM closed first)."""
        if self._map.closed:
            return
        self.view.release()
        uapi.ffi.release(self._cbuf)
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"GuestMemory(gpa={self.gpa:#x}, size={self.size:#x})"
