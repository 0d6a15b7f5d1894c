"""virtio-blk (OASIS virtio 1.2, 5.2 "Block Device") backed by a host file, as pure logic over
guest memory: a VirtioDevice (see kvmits.machine.devices.virtio.pci) that a VirtioPciFunction
carries.

The disk is a file (or block device) the device opens itself: O_RDWR, or O_RDONLY for a
read-only disk (VIRTIO_BLK_F_RO). It is never created and never extended: `capacity` is its
size in 512-byte sectors at open time (5.2.4: capacity is "expressed in 512-byte sectors"); a
tail that is not a whole sector is not exposed. Requests use os.pread / os.pwritev at offsets
checked against the capacity.

Offered features (5.2.3): SIZE_MAX, SEG_MAX, BLK_SIZE (512), FLUSH, RO for a read-only disk,
MQ with more than one queue, and the ring features INDIRECT_DESC and EVENT_IDX. CONFIG_WCE is
not offered, so the configuration space is read-only (writes are ignored and counted) and
`writeback` says what FLUSH negotiation made the cache (5.2.5 driver requirements: without
CONFIG_WCE a driver that negotiated FLUSH assumes a writeback cache): 1 with FLUSH, else 0.
Without FLUSH negotiated, every write is committed (fdatasync) before it completes, as 5.2.6.2
requires ("A write becomes stable once it is completed and ... neither VIRTIO_BLK_F_CONFIG_WCE
nor VIRTIO_BLK_F_FLUSH feature were negotiated, but VIRTIO_BLK_F_FLUSH was offered by the
device"; "the device MUST ensure that stable writes are committed to it, before reporting
completion").

A request (5.2.6, struct virtio_blk_req) is a 16-byte header {le32 type; le32 reserved; le64
sector} at the start of the device-readable part, the data, and the status byte, the last byte
of the device-writable part. 2.7.4 "Message Framing": the device MUST NOT assume a particular
arrangement of descriptors, so the header may be split across buffers and share one with data,
and the status byte may share the last writable buffer with data. Types: VIRTIO_BLK_T_IN,
VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID; every other type is
VIRTIO_BLK_S_UNSUPP. VIRTIO_BLK_S_IOERR for a range past the capacity or a length that is not a
multiple of 512 (5.2.6.1, driver MUSTs), a write to a read-only disk (5.2.6.2: "MUST set the
status byte to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature if
offered, and MUST NOT write any data"), more than seg_max + 2 buffers or more than
seg_max * size_max bytes of data (the bounds the device advertised), a data buffer outside
guest RAM, or an OSError from the file. The used length is the bytes the device placed in the
writable buffers, the status byte included (the legacy note of 5.2.6 calls putting more there
"historically, some devices").

A chain with no byte for the status, or fewer than 16 device-readable bytes for the header, or
whose status byte is outside guest RAM, cannot be completed at all: the device sets
DEVICE_NEEDS_RESET (set_needs_reset(BLK_BAD_REQUEST, ...), 2.1.2) and stops serving that queue
until the driver resets the device; the chain is not returned. Nothing a guest puts in a chain
makes notify raise, and nothing is allocated in proportion to a guest length beyond size_max:
data moves in pieces of at most size_max bytes, whatever the buffers' lengths.

Threads: notify comes from the device's ioeventfd thread or a vCPU (an MMIO notify), reset and
close from other threads; one lock per device serialises them, so a queue is served by one
thread at a time and reset() waits for a notify in flight, which stops (without returning the
request it was on) as soon as the transport no longer has the queue. config_read and
config_write are called with the transport's lock held and take no lock of the device (the
transport's lock is only ever taken inside the device's, never the other way round).
"""

from __future__ import annotations

import logging
import os
import struct
import threading

from kvmits.errors import GuestMemoryError
from kvmits.machine.devices.virtio.virtqueue import (MAX_QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX,
                                                     VIRTIO_RING_F_INDIRECT_DESC, Virtqueue)
from kvmits.machine.saved_state import StateChecker

log = logging.getLogger(__name__)

#: 5.2.1 (Linux's virtio_ids.h VIRTIO_ID_BLOCK)
VIRTIO_ID_BLOCK = 2
#: PCI Code and ID Assignment: base class 01h (mass storage controller), sub-class 80h (other)
PCI_CLASS_STORAGE_OTHER = 0x018000

# -- feature bits (5.2.3) -----------------------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12

# -- struct virtio_blk_config (5.2.4), offsets ---------------------------------------------------
VIRTIO_BLK_CFG_CAPACITY = 0         # le64, in 512-byte sectors
VIRTIO_BLK_CFG_SIZE_MAX = 8         # le32
VIRTIO_BLK_CFG_SEG_MAX = 12         # le32
VIRTIO_BLK_CFG_GEOMETRY = 16        # {le16 cylinders; u8 heads; u8 sectors}: not offered, 0
VIRTIO_BLK_CFG_BLK_SIZE = 20        # le32
VIRTIO_BLK_CFG_TOPOLOGY = 24        # 8 bytes: not offered, 0
VIRTIO_BLK_CFG_WRITEBACK = 32       # u8
VIRTIO_BLK_CFG_UNUSED0 = 33         # u8, 0 (5.2.5: "MUST initialize padding bytes unused0 ... to 0")
VIRTIO_BLK_CFG_NUM_QUEUES = 34      # le16 (meaningful with MQ)
#: the fields up to num_queues: DISCARD, WRITE_ZEROES, SECURE_ERASE and ZONED are not offered
VIRTIO_BLK_CONFIG_SIZE = 36

# -- requests (5.2.6) -------------------------------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
#: 5.2.6: "The device ID string is a NUL-padded ASCII string up to 20 bytes long" (Linux's name)
VIRTIO_BLK_ID_BYTES = 20
#: 5.2.5: the unit of the protocol is always 512 bytes, whatever blk_size says
SECTOR_SIZE = 512
#: struct virtio_blk_req before data[] (5.2.6)
VIRTIO_BLK_REQ_HEADER = struct.Struct("<IIQ")
HEADER_SIZE = VIRTIO_BLK_REQ_HEADER.size

DEFAULT_QUEUE_SIZE = 256
#: size_max: the largest segment, and the largest piece of data moved at once (Linux needs at
#: least a page, 64 KiB with 64K pages)
SIZE_MAX = 128 * 1024
#: seg_max is queue_size - 2 (a chain is header + segments + status and may not be longer than
#: the queue) up to this, which also keeps a batch of pwritev pieces under IOV_MAX (1024)
SEG_MAX_LIMIT = 254

#: the set_needs_reset reason of a chain that cannot be completed
BLK_BAD_REQUEST = "BLK_BAD_REQUEST"

_CHECK = StateChecker("virtio-blk")

_STATUS = tuple(bytes((s,)) for s in range(3))


def _batches(parts: list[tuple[int, int]], limit: int):
    """The (gpa, length) `parts` regrouped into batches of at most `limit` bytes (a part cut
    where a batch fills): yields (list of (gpa, length), total length)."""
    batch: list[tuple[int, int]] = []
    size = 0
    for gpa, n in parts:
        while n:
            k = min(n, limit - size)
            batch.append((gpa, k))
            size += k
            gpa += k
            n -= k
            if size == limit:
                yield batch, size
                batch, size = [], 0
    if size:
        yield batch, size


class VirtioBlk:
    """A virtio block device on the file at `path`, `num_queues` request queues of at most
    `queue_size` entries each (5.2.2), `serial` the device ID string of VIRTIO_BLK_T_GET_ID (at
    most 20 ASCII bytes; by default the file's name, cut to 20). Set `function` to the
    VirtioPciFunction carrying it before the driver can notify; close() closes the file.

    Counters: `reads`, `writes`, `flushes`, `get_ids`, `unsupported` (requests by type),
    `io_errors` (requests completed with VIRTIO_BLK_S_IOERR), `bytes_read` / `bytes_written`
    (moved between the file and guest memory), `bad_requests` (chains that could not be
    completed: DEVICE_NEEDS_RESET), `ignored_config_writes`."""

    device_type = VIRTIO_ID_BLOCK
    pci_class = PCI_CLASS_STORAGE_OTHER
    config_size = VIRTIO_BLK_CONFIG_SIZE

    def __init__(self, path: str | os.PathLike, readonly: bool = False, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, serial: str | bytes | None = None,
                 msix_vectors: int | None = None):
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} is not in 1..65535 (le16 num_queues, 5.2.4)")
        if not 4 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of 2 in 4..{MAX_QUEUE_SIZE}")
        if serial is None:
            serial = os.path.basename(os.fsdecode(path)).encode("ascii", "replace")[:VIRTIO_BLK_ID_BYTES]
        elif isinstance(serial, str):
            serial = serial.encode("ascii")
        if len(serial) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.path = os.fsdecode(path)
        self.readonly = readonly
        #: the function's MSI-X table size; None: one vector per queue plus one for configuration
        #: changes. With 2 and two queues or more, Linux's virtio_pci cannot give each queue its
        #: own vector and shares one among them (vp_find_vqs' second choice), an interrupt whose
        #: affinity it does not manage: /proc/irq/N/smp_affinity can move it (a per-queue vector
        #: is managed, and a write there fails with EIO)
        self.msix_vectors = msix_vectors
        self.serial = bytes(serial)
        self._id = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self._fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(self._fd, 0, os.SEEK_END)     # st_size is 0 for a block device
        except OSError:
            os.close(self._fd)
            raise
        #: the disk's size in 512-byte sectors
        self.capacity = size // SECTOR_SIZE
        self.queue_max_sizes = (queue_size,) * num_queues
        self.seg_max = min(queue_size - 2, SEG_MAX_LIMIT)
        self.size_max = SIZE_MAX
        self.device_features = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                                | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_RING_F_INDIRECT_DESC
                                | 1 << VIRTIO_RING_F_EVENT_IDX
                                | (1 << VIRTIO_BLK_F_RO if readonly else 0)
                                | (1 << VIRTIO_BLK_F_MQ if num_queues > 1 else 0))
        self._max_buffers = self.seg_max + 2
        self._max_data = self.seg_max * self.size_max
        self._config = bytearray(VIRTIO_BLK_CONFIG_SIZE)
        struct.pack_into("<QII", self._config, VIRTIO_BLK_CFG_CAPACITY, self.capacity, self.size_max, self.seg_max)
        struct.pack_into("<I", self._config, VIRTIO_BLK_CFG_BLK_SIZE, SECTOR_SIZE)
        struct.pack_into("<H", self._config, VIRTIO_BLK_CFG_NUM_QUEUES, num_queues)
        #: the VirtioPciFunction carrying the device (set by whoever creates both)
        self.function = None

        self.reads = self.writes = self.flushes = self.get_ids = self.unsupported = 0
        self.io_errors = 0
        self.bytes_read = self.bytes_written = 0
        self.bad_requests = 0
        self.ignored_config_writes = 0
        self._lock = threading.Lock()
        self._stopped: set[int] = set()     # queues that met a request they cannot complete
        self._host_error_logged = False

    # -- configuration (5.2.4); called with the transport's lock held ----------------------------
    def config_read(self, offset: int, size: int) -> int:
        cfg = self._config
        cfg[VIRTIO_BLK_CFG_WRITEBACK] = self._flush_negotiated()
        return int.from_bytes(cfg[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        # writeback is the only writable field, and only with CONFIG_WCE (5.2.5), not offered
        self.ignored_config_writes += 1

    def _flush_negotiated(self) -> bool:
        fn = self.function
        return fn is not None and fn.negotiated(VIRTIO_BLK_F_FLUSH)

    # -- save and restore (issue 13; with VirtioPciFunction.save_state) ------------------------------
    def save_state(self) -> dict:
        """What the device keeps besides its transport: the queues a bad request stopped, and
        the disk's shape, which a restore checks (the disk's contents are the file's: a
        snapshot does not carry them, the destination opens the same file)."""
        with self._lock:
            return {"capacity": self.capacity, "readonly": self.readonly, "num_queues": len(self.queue_max_sizes),
                    "stopped": sorted(self._stopped)}

    def load_state(self, saved) -> None:
        """Apply a save_state() dict: ValueError (nothing changes) if it is malformed or the
        disk is not the same shape (capacity, read-only, queues): a guest's driver keeps its
        view of the disk across a migration."""
        _CHECK.fields(saved, ("capacity", "readonly", "num_queues", "stopped"), None)
        mine = {"capacity": self.capacity, "readonly": self.readonly, "num_queues": len(self.queue_max_sizes)}
        for name, value in mine.items():
            if saved[name] != value or type(saved[name]) is not type(value):
                raise _CHECK.error(f"the disk {self.path} has {name} {value!r}, the state {saved[name]!r}")
        stopped = {_CHECK.int(i, "stopped[]", len(self.queue_max_sizes))
                   for i in _CHECK.list(saved["stopped"], "stopped", len(self.queue_max_sizes))}
        with self._lock:
            self._stopped = stopped

    # -- lifetime ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """2.4: forget the queues (the transport dropped them); a notify in flight finishes its
        request first (and serves no more of a queue the transport dropped). Counters are kept."""
        with self._lock:
            self._stopped.clear()

    def close(self) -> None:
        """Close the file; requests after this complete with VIRTIO_BLK_S_IOERR."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> VirtioBlk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the queues ---------------------------------------------------------------------------------
    def notify(self, index: int, vq: Virtqueue) -> None:
        """The driver notified queue `index`: serve it (VirtioPciFunction.serve), unless a
        request it could not complete stopped it until the next reset."""
        with self._lock:
            if index not in self._stopped:
                mem = vq.memory
                self.function.serve(index, vq, lambda chain: self._request(index, mem, chain))

    def _bad(self, index: int, detail: str) -> int:
        """A chain the device cannot complete (module docstring): DEVICE_NEEDS_RESET, and the
        queue is not served again until a reset."""
        self.bad_requests += 1
        self._stopped.add(index)
        self.function.set_needs_reset(BLK_BAD_REQUEST, detail, index)
        return -1

    def _request(self, index: int, mem, chain) -> int:
        """Carry out one request; the used length, or -1 when it cannot be completed."""
        if chain.readable < HEADER_SIZE or chain.writable < 1:
            return self._bad(index, f"head {chain.head}: {chain.readable} device-readable bytes (a header "
                                    f"needs {HEADER_SIZE}), {chain.writable} device-writable (a status byte needs 1)")
        # split the chain: header pieces, readable data after it, writable data before the status
        header: list[tuple[int, int]] = []
        out: list[tuple[int, int]] = []
        into: list[tuple[int, int]] = []
        need = HEADER_SIZE
        left = chain.writable - 1           # writable bytes before the status byte
        status_at = 0
        for gpa, n, writable in chain.buffers:
            if writable:
                if n <= left:
                    if n:
                        into.append((gpa, n))
                        left -= n
                else:                       # the buffer holding the last writable byte
                    if left:
                        into.append((gpa, left))
                    status_at = gpa + left
                    left = 0                # the writable buffers after it are empty
            elif need:
                if n <= need:
                    if n:                   # an empty buffer holds nothing, wherever it points
                        header.append((gpa, n))
                        need -= n
                else:
                    header.append((gpa, need))
                    out.append((gpa + need, n - need))
                    need = 0
            elif n:
                out.append((gpa, n))

        status, placed = VIRTIO_BLK_S_IOERR, 0
        try:
            raw = mem.read(*header[0]) if len(header) == 1 else b"".join(mem.read(g, n) for g, n in header)
        except GuestMemoryError:
            raw = None
        if raw is not None and len(chain.buffers) <= self._max_buffers:
            rtype, _reserved, sector = VIRTIO_BLK_REQ_HEADER.unpack(raw)
            if rtype == VIRTIO_BLK_T_IN:
                self.reads += 1
                status, placed = self._read(mem, sector, into, chain.writable - 1)
            elif rtype == VIRTIO_BLK_T_OUT:
                self.writes += 1
                status = self._write(mem, sector, out, chain.readable - HEADER_SIZE)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                # 5.2.6.2 case 3: the writes completed before it become stable when it completes
                self.flushes += 1
                status = self._sync()
            elif rtype == VIRTIO_BLK_T_GET_ID:
                self.get_ids += 1
                status, placed = self._get_id(mem, into)
            else:
                self.unsupported += 1
                status = VIRTIO_BLK_S_UNSUPP
        if status == VIRTIO_BLK_S_IOERR:
            self.io_errors += 1
        try:
            mem.write(status_at, _STATUS[status])
        except GuestMemoryError:
            return self._bad(index, f"head {chain.head}: the status byte at {status_at:#x} is not in guest RAM")
        return placed + 1

    def _in_range(self, sector: int, length: int) -> bool:
        """5.2.6.1: whole sectors, inside the capacity; and within what the device advertised."""
        return (not length % SECTOR_SIZE and length <= self._max_data
                and sector <= self.capacity and length <= (self.capacity - sector) * SECTOR_SIZE)

    def _read(self, mem, sector: int, parts: list[tuple[int, int]], length: int) -> tuple[int, int]:
        """VIRTIO_BLK_T_IN: one pread per size_max bytes, scattered into the buffers."""
        if not self._in_range(sector, length):
            return VIRTIO_BLK_S_IOERR, 0
        fd, offset, done = self._fd, sector * SECTOR_SIZE, 0
        try:
            for batch, size in _batches(parts, self.size_max):
                data = os.pread(fd, size, offset)
                if len(data) != size:       # the file shrank under the disk
                    return VIRTIO_BLK_S_IOERR, done
                view, pos = memoryview(data), 0
                for gpa, n in batch:
                    mem.write(gpa, view[pos:pos + n])
                    pos += n
                    done += n
                offset += size
        except GuestMemoryError:
            return VIRTIO_BLK_S_IOERR, done
        except OSError as e:
            self._host_error("pread", e)
            return VIRTIO_BLK_S_IOERR, done
        finally:
            self.bytes_read += done
        return VIRTIO_BLK_S_OK, done

    def _write(self, mem, sector: int, parts: list[tuple[int, int]], length: int) -> int:
        """VIRTIO_BLK_T_OUT: the buffers gathered into one pwritev per size_max bytes."""
        if self.readonly or not self._in_range(sector, length):
            return VIRTIO_BLK_S_IOERR
        fd, offset = self._fd, sector * SECTOR_SIZE
        try:
            for batch, size in _batches(parts, self.size_max):
                written = os.pwritev(fd, [mem.read(gpa, n) for gpa, n in batch], offset)
                self.bytes_written += written
                if written != size:         # no space left on the host, most likely
                    return VIRTIO_BLK_S_IOERR
                offset += size
        except GuestMemoryError:
            return VIRTIO_BLK_S_IOERR
        except OSError as e:
            self._host_error("pwritev", e)
            return VIRTIO_BLK_S_IOERR
        if not self._flush_negotiated():
            return self._sync()             # write-through (module docstring, 5.2.6.2 case 1)
        return VIRTIO_BLK_S_OK

    def _sync(self) -> int:
        # fdatasync: the data and what is needed to read it back (the size never changes)
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            self._host_error("fdatasync", e)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _get_id(self, mem, parts: list[tuple[int, int]]) -> tuple[int, int]:
        """VIRTIO_BLK_T_GET_ID: the 20-byte NUL-padded ID into the data buffers (5.2.6.1: the
        driver gives 20 bytes; fewer take its first bytes)."""
        ident, pos = self._id, 0
        try:
            for gpa, n in parts:
                if pos == VIRTIO_BLK_ID_BYTES:
                    break
                k = min(n, VIRTIO_BLK_ID_BYTES - pos)
                mem.write(gpa, ident[pos:pos + k])
                pos += k
        except GuestMemoryError:
            return VIRTIO_BLK_S_IOERR, pos
        return VIRTIO_BLK_S_OK, pos

    def _host_error(self, call: str, e: OSError) -> None:
        """A failure of the host file: VIRTIO_BLK_S_IOERR to the driver, logged the first time."""
        if not self._host_error_logged:
            self._host_error_logged = True
            log.warning("virtio-blk %s: %s failed: %s (requests fail with VIRTIO_BLK_S_IOERR; logged once)",
                        self.path, call, e)

    def __repr__(self) -> str:
        return (f"VirtioBlk({self.path!r}, capacity={self.capacity}, readonly={self.readonly}, "
                f"queues={len(self.queue_max_sizes)})")
