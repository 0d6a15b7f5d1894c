"""The device side of a split virtqueue (OASIS virtio 1.2, 2.7 "Split Virtqueues").

A split virtqueue is three guest-memory areas the driver allocates and the device only reads
or writes through `memory.read(gpa, size)` / `memory.write(gpa, data)` (kvmits.kvm.GuestMemory,
or anything with the same two methods that raises GuestMemoryError outside guest RAM):

- the descriptor table (2.7.5): `size` entries of struct virtq_desc {le64 addr; le32 len;
  le16 flags; le16 next}, 16-byte aligned;
- the available ring (2.7.6), written by the driver: {le16 flags; le16 idx; le16 ring[size];
  le16 used_event}, 2-byte aligned (used_event only means something with EVENT_IDX);
- the used ring (2.7.8), written by the device: {le16 flags; le16 idx; struct {le32 id;
  le32 len} ring[size]; le16 avail_event}, 4-byte aligned.

The guest is hostile. Nothing a driver writes into these areas makes a `Virtqueue` method
raise, loop without bound or allocate in proportion to a guest-supplied length: every
violation of a "driver MUST" the device can see is a `VirtqueueError` reason, returned, after
which the queue is *broken* (every later pop returns the same reason). The device turns that
into DEVICE_NEEDS_RESET (2.1.2: "the device has experienced an error from which it can't
re-cover"). Each reason is counted in a `VirtqueueStats` (shared by the queues of a device,
across resets, so a guest that breaks its queues in a loop cannot flood the log: a reason is
logged the first time only).

A Virtqueue belongs to one thread (the device's): it keeps the ring cursors unlocked and its
memory barrier (`_Fence`) relies on that.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
import threading

from kvmits.errors import GuestMemoryError
from kvmits.machine.saved_state import StateChecker

log = logging.getLogger(__name__)

# -- constants (virtio 1.2) ----------------------------------------------------------------------
#: 2.7.5 struct virtq_desc flags: the buffer continues in the descriptor named by `next`
VIRTQ_DESC_F_NEXT = 1
#: 2.7.5: the buffer is device write-only (otherwise device read-only)
VIRTQ_DESC_F_WRITE = 2
#: 2.7.5.3: the buffer is a table of descriptors (an indirect descriptor table)
VIRTQ_DESC_F_INDIRECT = 4
#: 2.7.10 used->flags: the device asks the driver not to notify it of available buffers
VIRTQ_USED_F_NO_NOTIFY = 1
#: 2.7.7 avail->flags: the driver asks the device not to interrupt it for used buffers
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: 6 "Reserved Feature Bits": VIRTIO_F_INDIRECT_DESC, bit 28 (the name of Linux's and the
#: spec listing's virtio_ring.h): the driver may use indirect descriptors (2.7.5.3)
VIRTIO_RING_F_INDIRECT_DESC = 28
#: 6: VIRTIO_F_EVENT_IDX, bit 29: used_event / avail_event replace the flags (2.7.7, 2.7.10)
VIRTIO_RING_F_EVENT_IDX = 29

#: 2.7: "Queue Size ... is always a power of 2. The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768
#: 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
MAX_CHAIN_BYTES = 1 << 32
#: 2.7 "Virtqueue Part" alignment table
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

DESC_SIZE = 16                      # sizeof(struct virtq_desc)

_DESC = struct.Struct("<QIHH")      # struct virtq_desc (2.7.5)
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")   # struct virtq_used_elem {le32 id; le32 len} (2.7.8)


def desc_table_bytes(size: int) -> int:
    """Bytes of the descriptor table of a queue of `size` (2.7, "Virtqueue Part" table)."""
    return DESC_SIZE * size


def avail_ring_bytes(size: int) -> int:
    """flags, idx, ring[size], used_event (2.7.6)."""
    return 6 + 2 * size


def used_ring_bytes(size: int) -> int:
    """flags, idx, ring[size] of 8-byte elements, avail_event (2.7.8)."""
    return 6 + 8 * size


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """The notification rule of EVENT_IDX (2.7.7.2 and 2.7.10, the spec's vring_need_event()):
    notify if `event_idx` is among the indices the other side moved over, [old, new_idx), all
    modulo 2**16, i.e. (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


class VirtqueueError(enum.Enum):
    """Why a queue broke: a driver error the device detected (each a "driver MUST" of 2.7)."""

    #: an access to the descriptor table, an indirect table or a ring failed (GuestMemoryError)
    OUTSIDE_RAM = "a ring or descriptor table is not in guest RAM"
    #: avail->idx moved more than `size` past the last index the device consumed (2.7.6: the
    #: driver can only have `size` buffers outstanding)
    AVAIL_IDX_JUMP = "avail idx is more than the queue size ahead of the last one consumed"
    #: an avail ring entry names a descriptor >= size (2.7.6: ring[] holds heads of chains)
    HEAD_OUT_OF_RANGE = "an available ring entry is not a descriptor index"
    #: a `next` >= size, or >= the entries of its indirect table (2.7.5, 2.7.5.3)
    NEXT_OUT_OF_RANGE = "a next index is past the end of its descriptor table"
    #: more descriptors than allowed, which a loop always is (2.7.5.3.1 in virtio 1.1: "A
    #: driver MUST NOT create a descriptor chain longer than the Queue Size of the device")
    CHAIN_TOO_LONG = "a descriptor chain longer than the queue size (a loop?)"
    #: the buffers' lengths add up past the bound (2.7.5.2: at most 2^32 bytes)
    CHAIN_TOO_BIG = "a descriptor chain's buffers add up to more bytes than allowed"
    #: a device-readable buffer after a device-writable one (2.7.4.2: "The driver MUST place
    #: any device-writable descriptor elements after any device-readable descriptor elements")
    READABLE_AFTER_WRITABLE = "a device-readable descriptor follows a device-writable one"
    #: VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated (2.7.5.3.1)
    INDIRECT_NOT_NEGOTIATED = "an indirect descriptor, but INDIRECT_DESC was not negotiated"
    #: VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT (2.7.5.3.1 forbids both)
    INDIRECT_WITH_NEXT = "an indirect descriptor with the NEXT flag"
    #: VIRTQ_DESC_F_INDIRECT inside an indirect table (2.7.5.3.1: one table per descriptor)
    NESTED_INDIRECT = "an indirect descriptor inside an indirect table"
    #: an indirect table of 0 bytes or not a multiple of 16 (2.7.5.3: len/16 descriptors)
    INDIRECT_BAD_LENGTH = "an indirect table whose length is 0 or not a multiple of 16"
    #: an indirect table with more entries than a chain may have
    INDIRECT_TOO_LARGE = "an indirect table with more descriptors than a chain may have"


class VirtqueueConfigError(ValueError):
    """The driver configured a queue the spec does not allow (size or alignment, 2.7)."""


class VirtqueueStats:
    """Error counts per reason, and which reasons were logged, for the queues of one device
    over their lifetimes (a device passes the same stats to each queue it (re)creates)."""

    def __init__(self) -> None:
        self.errors: collections.Counter[VirtqueueError] = collections.Counter()
        self._logged: set[VirtqueueError] = set()

    def record(self, queue: str, reason: VirtqueueError, detail: str) -> None:
        self.errors[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("virtqueue %s broken: %s (%s); the device needs a reset "
                        "(logged once per reason)", queue, reason.value, detail)


class Chain:
    """One available descriptor chain (2.7.4 "Message Framing"): `head` is the index to give
    back with push(); `buffers` are (gpa, len, device_writable) in chain order, the readable
    ones first (checked); `readable` / `writable` are their total lengths in bytes."""

    __slots__ = ("head", "buffers", "readable", "writable")

    def __init__(self, head: int, buffers: list[tuple[int, int, bool]], readable: int, writable: int):
        self.head = head
        self.buffers = buffers
        self.readable = readable
        self.writable = writable

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and (self.head, self.buffers) == (other.head, other.buffers)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, buffers={self.buffers})"


class _Fence:
    """A full memory barrier from Python, where the split ring needs one (2.7.13.3 and 2.7.14
    on the driver side; the device mirrors them): between reading avail->idx and the entries
    it covers (a read barrier), between writing a used element and used->idx (a write
    barrier), and between publishing used->idx or avail_event and reading used_event or
    avail->idx back (a store-load barrier, what Linux's vhost uses smp_mb() for).

    Python has no fence instruction. Releasing a lock held by this thread and taking it back
    is a store-release followed by a load-acquire (the semaphore operations under
    threading.Lock), which arm64 orders in program order (RCsc), so no access before it is
    observed after an access after it; on x86 both are locked instructions, full barriers
    each. Blocking never happens: the lock is private to one queue and its one thread.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def __call__(self) -> None:
        self._lock.release()
        self._lock.acquire()


class Virtqueue:
    """The device side of one split virtqueue.

    `size` is the Queue Size the driver chose, `desc`, `avail` and `used` the guest-physical
    addresses of the three parts (2.7; each aligned as the spec's table says), `event_idx` and
    `indirect_desc` whether VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC were negotiated.
    A chain may have at most `max_descriptors` buffers (default `size`, the bound of virtio
    1.1 2.7.5.3.1; a device that offers a smaller seg_max may pass less) and `max_chain_bytes`
    bytes in total (default 2^32, 2.7.5.2). `last_avail_idx` and `used_idx` start at 0 as
    after a reset (2.7); other values restore a saved queue. A configuration the spec forbids
    raises VirtqueueConfigError (the transport refuses to enable such a queue); nothing later
    raises because of what the guest wrote.
    """

    def __init__(self, memory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool = False, indirect_desc: bool = False,
                 max_descriptors: int | None = None, max_chain_bytes: int = MAX_CHAIN_BYTES,
                 last_avail_idx: int = 0, used_idx: int = 0,
                 stats: VirtqueueStats | None = None, name: str = "vq"):
        if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
            raise VirtqueueConfigError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE} (2.7)")
        for what, addr, align in (("descriptor table", desc, DESC_ALIGN), ("available ring", avail, AVAIL_ALIGN),
                                  ("used ring", used, USED_ALIGN)):
            if addr < 0 or addr % align:
                raise VirtqueueConfigError(f"{what} at {addr:#x} is not {align}-byte aligned (2.7)")
        if max_descriptors is None:
            max_descriptors = size
        if max_descriptors < 1 or max_chain_bytes < 0:
            raise ValueError("max_descriptors must be >= 1 and max_chain_bytes >= 0")
        self.memory = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect_desc = indirect_desc
        self.max_descriptors = max_descriptors
        self.max_chain_bytes = max_chain_bytes
        self.stats = stats if stats is not None else VirtqueueStats()
        self.name = name
        #: the reason the queue broke, None while it works
        self.broken: VirtqueueError | None = None
        self.broken_detail = ""
        self._mask = size - 1
        self._last_avail = last_avail_idx & 0xFFFF
        self._avail_shadow = self._last_avail       # the last avail->idx read
        self._used_idx = used_idx & 0xFFFF
        self._signalled_used = self._used_idx        # used idx at the last needs_interrupt()
        self._notify = True                          # available buffer notifications enabled
        self._fence = _Fence()
        # fixed addresses of the hot fields
        self._avail_idx_at = avail + 2
        self._avail_ring_at = avail + 4
        self._used_event_at = avail + 4 + 2 * size
        self._used_idx_at = used + 2
        self._used_ring_at = used + 4
        self._avail_event_at = used + 4 + 8 * size

    # -- state --------------------------------------------------------------------------------
    @property
    def last_avail_idx(self) -> int:
        """The free-running (mod 2**16) index of the next avail ring entry to consume."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """The free-running (mod 2**16) used->idx the device has published."""
        return self._used_idx

    # -- save and restore (issue 13) -------------------------------------------------------------
    def save_state(self) -> dict:
        """The device's side of the queue that is not in guest memory: the ring cursors (the
        next avail entry to consume; the used idx published, and at the last needs_interrupt),
        whether driver notifications are enabled, and the reason it broke (None if working).
        The rings themselves are in guest RAM, which travels with it."""
        return {"last_avail_idx": self._last_avail, "used_idx": self._used_idx,
                "signalled_used": self._signalled_used, "notify": self._notify,
                "broken": None if self.broken is None else self.broken.name, "broken_detail": self.broken_detail}

    def load_state(self, saved: dict) -> None:
        """Apply a save_state() dict (checked by check_state) to this queue, made with the saved
        addresses and features and never popped from. The guest's rings are not read or written:
        they are as the source left them."""
        last, used, signalled, notify, broken, detail = check_state(saved)
        self._last_avail = self._avail_shadow = last
        self._used_idx = used
        self._signalled_used = signalled
        self._notify = notify
        self.broken = broken
        self.broken_detail = detail

    def _fail(self, reason: VirtqueueError, detail: str) -> VirtqueueError:
        self.broken = reason
        self.broken_detail = detail
        self.stats.record(self.name, reason, detail)
        return reason

    # -- available buffers ----------------------------------------------------------------------
    def pop(self) -> Chain | VirtqueueError | None:
        """The next available chain (2.7.13 seen from the device), None if the driver has made
        none available since, or the VirtqueueError that broke the queue (now or before).

        A chain is the head descriptor followed through VIRTQ_DESC_F_NEXT, where the last
        descriptor may name an indirect table (2.7.5.3.2: "The device MUST handle the case of
        zero or more normal chained descriptors followed by a single descriptor with
        flags&VIRTQ_DESC_F_INDIRECT"), whose entries are followed through `next` inside the
        table. At most max_descriptors buffers are visited, so a loop ends as CHAIN_TOO_LONG.
        """
        if self.broken is not None:
            return self.broken
        mem = self.memory
        last = self._last_avail
        try:
            if last == self._avail_shadow:
                idx = _U16.unpack(mem.read(self._avail_idx_at, 2))[0]
                if ((idx - last) & 0xFFFF) > self.size:
                    return self._fail(VirtqueueError.AVAIL_IDX_JUMP,
                                      f"avail idx {idx}, last consumed {last}, size {self.size}")
                self._avail_shadow = idx
                if idx == last:
                    return None
                # read barrier: the ring entries and descriptors the driver published before
                # this idx (it wrote them, then a barrier, then idx: 2.7.13.3) are read after it
                self._fence()
            head = _U16.unpack(mem.read(self._avail_ring_at + 2 * (last & self._mask), 2))[0]
        except GuestMemoryError as e:
            return self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
        if head >= self.size:
            return self._fail(VirtqueueError.HEAD_OUT_OF_RANGE, f"avail ring[{last & self._mask}] = {head}")
        chain = self._walk(head)
        if chain.__class__ is VirtqueueError:
            return chain
        last = (last + 1) & 0xFFFF
        self._last_avail = last
        if self.event_idx and self._notify:
            # 2.7.10: avail_event tells the driver which avail idx to notify at; keeping it at
            # the next one to consume means "notify me of anything new" while enabled
            try:
                mem.write(self._avail_event_at, _U16.pack(last))
            except GuestMemoryError as e:
                return self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
        return chain

    def _walk(self, head: int) -> Chain | VirtqueueError:
        """Follow the chain at `head` (2.7.5, 2.7.5.3) with every bound of the module doc."""
        mem = self.memory
        unpack_from = _DESC.unpack_from
        fail = self._fail
        E = VirtqueueError
        max_desc = self.max_descriptors
        max_bytes = self.max_chain_bytes
        buffers: list[tuple[int, int, bool]] = []
        readable = writable = 0
        table: bytes | None = None      # the indirect table once the chain entered one
        limit = self.size               # valid indices of the current table
        i = head
        try:
            while True:
                if table is None:
                    addr, length, flags, nxt = unpack_from(mem.read(self.desc + DESC_SIZE * i, DESC_SIZE))
                else:
                    addr, length, flags, nxt = unpack_from(table, DESC_SIZE * i)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if table is not None:
                        return fail(E.NESTED_INDIRECT, f"indirect table entry {i} of head {head}")
                    if not self.indirect_desc:
                        return fail(E.INDIRECT_NOT_NEGOTIATED, f"descriptor {i} of head {head}")
                    if flags & VIRTQ_DESC_F_NEXT:
                        return fail(E.INDIRECT_WITH_NEXT, f"descriptor {i} of head {head}")
                    if length == 0 or length % DESC_SIZE:
                        return fail(E.INDIRECT_BAD_LENGTH, f"descriptor {i}: table length {length}")
                    n = length // DESC_SIZE
                    if len(buffers) + n > max_desc:
                        # checked before reading, so the table read is bounded by max_descriptors
                        return fail(E.INDIRECT_TOO_LARGE, f"descriptor {i}: {n} entries after "
                                    f"{len(buffers)} buffers, at most {max_desc}")
                    # the WRITE flag of this descriptor is ignored (2.7.5.3.2)
                    table = mem.read(addr, length)
                    limit = n
                    i = 0
                    continue
                if len(buffers) == max_desc:
                    return fail(E.CHAIN_TOO_LONG, f"head {head}: more than {max_desc} descriptors")
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += length
                    buffers.append((addr, length, True))
                else:
                    if buffers and buffers[-1][2]:      # writable ones come last (2.7.4.2)
                        return fail(E.READABLE_AFTER_WRITABLE, f"head {head}, buffer {len(buffers)}")
                    readable += length
                    buffers.append((addr, length, False))
                if readable + writable > max_bytes:
                    return fail(E.CHAIN_TOO_BIG, f"head {head}: over {max_bytes} bytes")
                if not flags & VIRTQ_DESC_F_NEXT:
                    return Chain(head, buffers, readable, writable)
                if nxt >= limit:
                    return fail(E.NEXT_OUT_OF_RANGE, f"head {head}: next {nxt}, table of {limit}")
                i = nxt
        except GuestMemoryError as e:
            return fail(E.OUTSIDE_RAM, str(e))

    # -- used buffers ---------------------------------------------------------------------------
    def push(self, head: int, written: int) -> VirtqueueError | None:
        """Return the chain `head` to the driver with `written` bytes written into its
        device-writable buffers (2.7.8): the used element goes into ring[used idx % size],
        then used->idx advances (mod 2**16). None, or the reason the queue is broken.

        `head` must be one pop() returned and `written` fit in le32: these are the device's
        own values, so a wrong one is a bug in the device and raises ValueError."""
        if not (0 <= head < self.size) or not (0 <= written <= 0xFFFFFFFF):
            raise ValueError(f"push({head}, {written}) on a queue of size {self.size}")
        if self.broken is not None:
            return self.broken
        idx = self._used_idx
        mem = self.memory
        try:
            mem.write(self._used_ring_at + 8 * (idx & self._mask), _USED_ELEM.pack(head, written))
            # write barrier: the driver reads used->idx, then the elements below it (2.7.14),
            # so the element must be visible before the index that covers it
            self._fence()
            idx = (idx + 1) & 0xFFFF
            mem.write(self._used_idx_at, _U16.pack(idx))
        except GuestMemoryError as e:
            return self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
        self._used_idx = idx
        return None

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used buffer notification for what push() published since
        the last call (2.7.7.2). Without EVENT_IDX: unless avail->flags has
        VIRTQ_AVAIL_F_NO_INTERRUPT. With EVENT_IDX: the flags are ignored and it is
        vring_need_event(used_event, used idx now, used idx at the last call). False when
        nothing was pushed since, or when the queue is broken (the device's reset
        notification is the configuration interrupt instead)."""
        if self.broken is not None:
            return False
        new, old = self._used_idx, self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        # store-load barrier: used->idx (just written) before used_event / flags are read, or
        # a driver that re-enabled interrupts meanwhile could miss its interrupt
        self._fence()
        try:
            if self.event_idx:
                used_event = _U16.unpack(self.memory.read(self._used_event_at, 2))[0]
                return vring_need_event(used_event, new, old)
            flags = _U16.unpack(self.memory.read(self.avail, 2))[0]
        except GuestMemoryError as e:
            self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
            return False
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available buffer notifications (2.7.10) ------------------------------------------------
    @property
    def notifications_enabled(self) -> bool:
        return self._notify

    def disable_notifications(self) -> VirtqueueError | None:
        """Ask the driver not to notify (while the device polls the queue anyway). Without
        EVENT_IDX: used->flags = VIRTQ_USED_F_NO_NOTIFY. With EVENT_IDX the device "MUST set
        flags to 0" (2.7.10.2) and stops moving avail_event forward instead, so the driver's
        vring_need_event() stays false once it passed the old one."""
        if self.broken is not None:
            return self.broken
        self._notify = False
        if not self.event_idx:
            try:
                self.memory.write(self.used, _U16.pack(VIRTQ_USED_F_NO_NOTIFY))
            except GuestMemoryError as e:
                return self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
        return None

    def enable_notifications(self) -> bool | VirtqueueError:
        """Ask the driver to notify again: used->flags = 0, or with EVENT_IDX avail_event =
        the next avail idx to consume. Returns whether buffers were made available meanwhile
        (True: pop them now, their notification may have been suppressed), or the reason the
        queue is broken. The re-read of avail->idx comes after a store-load barrier, so a
        buffer the driver published without notifying is seen here."""
        if self.broken is not None:
            return self.broken
        self._notify = True
        mem = self.memory
        try:
            if self.event_idx:
                mem.write(self._avail_event_at, _U16.pack(self._last_avail))
            else:
                mem.write(self.used, _U16.pack(0))
            self._fence()
            idx = _U16.unpack(mem.read(self._avail_idx_at, 2))[0]
        except GuestMemoryError as e:
            return self._fail(VirtqueueError.OUTSIDE_RAM, str(e))
        return idx != self._last_avail

    def __repr__(self) -> str:
        return (f"Virtqueue({self.name}, size={self.size}, desc={self.desc:#x}, avail={self.avail:#x}, "
                f"used={self.used:#x}, last_avail={self._last_avail}, used_idx={self._used_idx}"
                f"{', broken=' + self.broken.name if self.broken else ''})")


_CHECK = StateChecker("virtqueue")
_STATE_KEYS = ("last_avail_idx", "used_idx", "signalled_used", "notify", "broken", "broken_detail")
#: a broken queue's detail is a line of text the device wrote; a bound against an edited file
BROKEN_DETAIL_MAX = 4096


def check_state(saved) -> tuple[int, int, int, bool, VirtqueueError | None, str]:
    """The fields of a Virtqueue.save_state() dict, checked (ValueError naming the first bad
    one): (last_avail_idx, used_idx, signalled_used, notify, broken, broken_detail)."""
    _CHECK.fields(saved, _STATE_KEYS, None)
    last, used, signalled = (_CHECK.int(saved[k], k, 1 << 16) for k in ("last_avail_idx", "used_idx",
                                                                         "signalled_used"))
    notify = saved["notify"]
    if type(notify) is not bool:
        raise _CHECK.error(f"notify must be a bool, not {notify!r}")
    broken = saved["broken"]
    if broken is not None:
        if broken not in VirtqueueError.__members__:
            raise _CHECK.error(f"broken {broken!r} is not a VirtqueueError reason")
        broken = VirtqueueError[broken]
    detail = saved["broken_detail"]
    if not isinstance(detail, str) or len(detail) > BROKEN_DETAIL_MAX:
        raise _CHECK.error(f"broken_detail must be a string of at most {BROKEN_DETAIL_MAX} characters")
    return last, used, signalled, notify, broken, detail
