"""A GICv3 ITS in pure Python: registers, command queue, translation (Arm IHI 0069, chapter 5).

`ItsModel` is the guest-visible ITS of one 128 KiB frame. The VMM forwards MMIO accesses to
`mmio_read` / `mmio_write` (offsets inside the frame; GITS_TRANSLATER writes carry the
DeviceID the bus gives) and device MSIs to `signal_msi`. Translated LPIs and the
redistributor side of commands go to an LPI sink (see interfaces.py).

The authoritative state is kept in Python dicts (devices, their ITEs, collections), like the
in-kernel ITS keeps it in kernel lists: guest memory holds the command queue and the level-1
entries of two-level tables (read at command time, as KVM does), while the device table,
ITTs and collection table are written and read only on `save_tables` / `restore_tables`
(KVM_DEV_ARM_ITS_SAVE_TABLES / RESTORE_TABLES) in the kernel's ABI rev 0 layout (abi.py).

Nothing a guest controls raises out of the model: bad accesses are logged (a bounded number
of lines), counted, read as zero and ignored on write; erroneous commands are counted with
their architectural error code and handled by the configured policy (ItsConfig).
"""

from __future__ import annotations

import collections as _collections
import logging
from typing import Callable, NamedTuple

from kvmits.errors import GuestMemoryError
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from kvmits.its.config import (
    CollectionUnmap, CwriterOutOfRange, ErrorPolicy, ItsConfig, MapdRemap, MaptiOverwrite,
)
from kvmits.its.interfaces import NullSink, Redistributors

COMMAND_NUMBER_MASK = C.COMMAND_NUMBER_MASK

log = logging.getLogger("kvmits.its")

# -- translation results -------------------------------------------------------------------
TRANSLATED = 0
MISS_ITS_DISABLED = 1
MISS_DEVICE_UNMAPPED = 2
MISS_EVENT_OUT_OF_RANGE = 3
MISS_NO_ITE = 4
MISS_COLLECTION_UNMAPPED = 5
REASON_NAMES = ("translated", "its-disabled", "device-unmapped", "event-out-of-range",
                "no-ite", "collection-unmapped")


class Translation(NamedTuple):
    """Where (DeviceID, EventID) goes: the LPI, its collection and target vCPU, or why not."""

    intid: int          # -1 on a miss
    icid: int           # -1 on a miss
    target: int         # vCPU index; -1 on a miss
    reason: int         # TRANSLATED, or one of the MISS_* values

    @property
    def ok(self) -> bool:
        return self.reason == TRANSLATED

    @property
    def reason_name(self) -> str:
        return REASON_NAMES[self.reason]


_MISS = tuple(Translation(-1, -1, -1, r) for r in range(len(REASON_NAMES)))


class MappingChange(NamedTuple):
    """A command (or host action) changed what some (DeviceID, EventID) translates to."""

    kind: str           # "MAPD", "MAPTI", "MAPI", "MOVI", "DISCARD", "MAPC", "MOVALL",
    #                     "BASER", "RESET", "LOAD", "RESTORE"
    devid: int          # -1 when not about one device
    eventid: int        # -1 when not about one event
    icid: int           # -1 when not about one collection
    generation: int     # ItsModel.generation after the change


class CommandError(NamedTuple):
    """One erroneous command, as kept in ItsModel.error_log."""

    code: int
    offset: int         # GITS_CREADR of the command
    command: int
    dwords: tuple

    @property
    def name(self) -> str:
        return C.error_name(self.code)


class BadAccess(NamedTuple):
    """One MMIO access the frame does not implement (read as 0 / ignored)."""

    kind: str           # "read" or "write"
    offset: int
    size: int
    value: int


# An ITE's ICID with this bit set is an orphan (CollectionUnmap.ORPHAN): no collection has
# it, so lookups miss without a separate check on the hot path. Real ICIDs are 16 bits.
_ORPHAN = 1 << 16


class _Device:
    __slots__ = ("itt_addr", "size_bits", "events")

    def __init__(self, itt_addr: int, size_bits: int):
        self.itt_addr = itt_addr
        self.size_bits = size_bits          # EventID bits (MAPD Size + 1)
        self.events: dict[int, tuple[int, int]] = {}    # eventid -> (intid, icid)


class ItsModel:
    """One GICv3 ITS: a 128 KiB MMIO frame, a command queue, and the translation it defines.

    memory: the guest memory (GuestMemory protocol).
    sink: the LPI sink (LpiSink protocol); default NullSink.
    redistributors: a RedistributorView, or a vCPU count (LPI INTIDs then end at 2^16).
    config: ItsConfig; default: behave like the in-kernel ITS of Linux 6.1.
    """

    def __init__(self, memory, sink=None, redistributors=1, config: ItsConfig | None = None):
        self.memory = memory
        self.sink = sink if sink is not None else NullSink()
        if isinstance(redistributors, int):
            redistributors = Redistributors(redistributors)
        self.redistributors = redistributors
        self.config = config if config is not None else ItsConfig()
        cfg = self.config
        self._devbits = cfg.devbits
        self._typer = R.make_typer(cfg.devbits, cfg.idbits, abi.ABI_REV0_ENTRY_SIZE)
        self._stall = cfg.error_policy is ErrorPolicy.STALL
        self._orphan_on_unmap = cfg.collection_unmap is CollectionUnmap.ORPHAN

        self.command_observers: list[Callable[[C.CommandRecord], None]] = []
        self.translation_observers: list[Callable[[int, int, Translation], None]] = []
        self.mapping_observers: list[Callable[[MappingChange], None]] = []

        # statistics (plain attributes: the MSI path increments them)
        self.commands_processed = 0
        self.msis = 0
        self.msis_delivered = 0
        self.miss_counts = [0] * len(REASON_NAMES)
        self.error_counts: dict[int, int] = {}
        self.error_log: _collections.deque[CommandError] = _collections.deque(
            maxlen=cfg.error_log_size)
        self.bad_access_count = 0
        self.bad_accesses: _collections.deque[BadAccess] = _collections.deque(maxlen=64)
        self.ro_writes = 0               # writes to read-only (or read-only-now) registers
        self.enable_refused = 0          # GITS_CTLR.Enabled = 1 without valid tables/queue
        self.targetless_commands = 0     # CLEAR/INV accepted for an ITE without a mapped collection
        self.zero_write_faults = 0       # MAPD V=0 / DISCARD entries outside guest RAM (zero_freed_entries)
        self._log_budget = cfg.log_limit

        self.generation = 0
        self._processing = False
        self._work = 0                   # ITEs walked by the commands of one process_commands()
        self._build_dispatch()
        # Each handler takes its command's fields, read as IHI 0069 5.3 lays them out: the
        # reads are compiled from the one table of layouts (kvmits.its.commands.LAYOUTS).
        handlers = {
            C.GITS_CMD_MAPD: self._cmd_mapd, C.GITS_CMD_MAPC: self._cmd_mapc,
            C.GITS_CMD_MAPTI: self._cmd_mapti, C.GITS_CMD_MAPI: self._cmd_mapi,
            C.GITS_CMD_MOVI: self._cmd_movi, C.GITS_CMD_MOVALL: self._cmd_movall,
            C.GITS_CMD_DISCARD: self._cmd_discard, C.GITS_CMD_INV: self._cmd_inv,
            C.GITS_CMD_INVALL: self._cmd_invall, C.GITS_CMD_INT: self._cmd_int,
            C.GITS_CMD_CLEAR: self._cmd_clear, C.GITS_CMD_SYNC: self._cmd_sync,
        }
        self._handlers = {cmd: C.LAYOUTS[cmd].bind(handler) for cmd, handler in handlers.items()}
        self._init_state()

    # ==========================================================================================
    # state
    # ==========================================================================================
    def _init_state(self) -> None:
        self._enabled = False
        self._cbaser = 0
        self._cq_base = 0
        self._cq_valid = False
        self._cq_size = 4096                # from CBASER.Size, Valid or not (as KVM)
        self._creadr = 0
        self._cwriter = 0
        self._stalled = False
        self._queue_invalid = False         # CwriterOutOfRange.STOP_QUEUE
        self._baser = [0] * R.GITS_BASER_COUNT
        esz = (abi.ABI_REV0_ENTRY_SIZE - 1) << R.GITS_BASER_ENTRY_SIZE_SHIFT
        self._baser[0] = (R.KVM_BASER_INITIAL | esz
                          | (R.GITS_BASER_TYPE_DEVICE << R.GITS_BASER_TYPE_SHIFT))
        self._baser[1] = (R.KVM_BASER_INITIAL | esz
                          | (R.GITS_BASER_TYPE_COLLECTION << R.GITS_BASER_TYPE_SHIFT))
        self._baser[0] = self._fix_page_size(self._baser[0])
        self._baser[1] = self._fix_page_size(self._baser[1])
        self._dt = R.decode_baser(self._baser[0])
        self._ct = R.decode_baser(self._baser[1])
        self._devices: dict[int, _Device] = {}
        self._collections: dict[int, int] = {}      # icid -> target vCPU
        self._placeholders: set[int] = set()        # KVM's collections without a target
        self._by_icid: dict[int, set[tuple[int, int]]] = {}
        self._ite_count = 0

    def reset(self) -> None:
        """The in-kernel ITS's reset (KVM_DEV_ARM_ITS_CTRL_RESET): disabled and quiescent,
        GITS_BASER<n>.Valid = 0 (other fields kept), GITS_CBASER = GITS_CREADR =
        GITS_CWRITER = 0, and no device or collection mapped."""
        self._release_all()
        baser0, baser1 = self._baser[0], self._baser[1]
        self._init_state()
        self._baser[0] = baser0 & ~R.GITS_BASER_VALID
        self._baser[1] = baser1 & ~R.GITS_BASER_VALID
        self._dt = R.decode_baser(self._baser[0])
        self._ct = R.decode_baser(self._baser[1])
        self._mapping_changed("RESET")

    # -- read-only views -------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def creadr(self) -> int:
        return self._creadr

    @property
    def cwriter(self) -> int:
        return self._cwriter

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def pending_commands(self) -> int:
        """Commands between GITS_CREADR and GITS_CWRITER (0 when the queue is invalid)."""
        if self._queue_invalid or self._cwriter >= self._cq_size:
            return 0
        return ((self._cwriter - self._creadr) % self._cq_size) // R.ITS_CMD_SIZE

    @property
    def ite_count(self) -> int:
        return self._ite_count

    def stats(self) -> dict:
        """Counters, as a fresh JSON-able dict."""
        return {
            "commands_processed": self.commands_processed,
            "command_errors": sum(self.error_counts.values()),
            "errors_by_code": {C.error_name(k): v for k, v in sorted(self.error_counts.items())},
            "msis": self.msis,
            "msis_delivered": self.msis_delivered,
            "msi_misses": {REASON_NAMES[r]: n for r, n in enumerate(self.miss_counts) if r and n},
            "bad_accesses": self.bad_access_count,
            "ro_writes": self.ro_writes,
            "enable_refused": self.enable_refused,
            "targetless_commands": self.targetless_commands,
            "zero_write_faults": self.zero_write_faults,
            "generation": self.generation,
            "devices": len(self._devices),
            "collections": len(self._collections),
            "ites": self._ite_count,
            "stalled": self._stalled,
            "pending_commands": self.pending_commands,
        }

    # ==========================================================================================
    # MMIO
    # ==========================================================================================
    def _build_dispatch(self) -> None:
        """Register tables: (offset -> accessor) per access size, as KVM's its_registers."""
        rd32: dict[int, Callable[[], int]] = {}
        rd64: dict[int, Callable[[], int]] = {}
        wr32: dict[int, Callable[[int], None]] = {}
        wr64: dict[int, Callable[[int], None]] = {}

        def reg32(off, read, write):
            rd32[off] = read
            wr32[off] = write

        def reg64(off, read, write, stored):
            # Both halves of a 64-bit register are accessible separately (IHI 0069: "Bits
            # [63:32] and bits [31:0] are accessible separately"); a half write merges into
            # the stored value and then acts as a write of the whole register.
            rd64[off] = read
            rd32[off] = lambda: read() & 0xFFFF_FFFF
            rd32[off + 4] = lambda: read() >> 32
            wr64[off] = write
            wr32[off] = lambda v: write((stored() & ~0xFFFF_FFFF) | v)
            wr32[off + 4] = lambda v: write((stored() & 0xFFFF_FFFF) | (v << 32))

        reg32(R.GITS_CTLR, self._read_ctlr, self._write_ctlr)
        reg32(R.GITS_IIDR, lambda: self.config.iidr, self._write_ro)
        reg64(R.GITS_TYPER, lambda: self._typer, self._write_ro, lambda: self._typer)
        reg64(R.GITS_CBASER, lambda: self._cbaser, self._write_cbaser, lambda: self._cbaser)
        reg64(R.GITS_CWRITER, lambda: self._cwriter, self._write_cwriter, lambda: self._cwriter)
        reg64(R.GITS_CREADR, self._read_creadr, self._write_ro, lambda: self._creadr)
        for n in range(R.GITS_BASER_COUNT):
            reg64(R.GITS_BASER0 + 8 * n, (lambda n=n: self._baser[n]),
                  (lambda v, n=n: self._write_baser(n, v)), (lambda n=n: self._baser[n]))
        for off in R.ID_REGISTER_OFFSETS:
            value = R.ID_REGISTERS.get(off, 0)
            reg32(off, (lambda v=value: v), self._write_ro)
        self._rd32, self._rd64, self._wr32, self._wr64 = rd32, rd64, wr32, wr64

    def mmio_read(self, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` in the ITS frame."""
        if size == 4:
            fn = self._rd32.get(offset)
        elif size == 8:
            fn = self._rd64.get(offset)
        else:
            fn = None
        if fn is None:
            return self._bad_access("read", offset, size, 0)
        return fn()

    def mmio_write(self, offset: int, size: int, value: int, devid: int = 0) -> None:
        """A guest write; for GITS_TRANSLATER `devid` is the writer's DeviceID."""
        if offset == R.GITS_TRANSLATER:
            # GITS_TRANSLATER takes 16-bit and 32-bit writes: the EventID.
            if size == 4:
                self.signal_msi(devid, value & 0xFFFF_FFFF)
                return
            if size == 2:
                self.signal_msi(devid, value & 0xFFFF)
                return
            self._bad_access("write", offset, size, value)
            return
        if size == 4:
            fn = self._wr32.get(offset)
            value &= 0xFFFF_FFFF
        elif size == 8:
            fn = self._wr64.get(offset)
            value &= 0xFFFF_FFFF_FFFF_FFFF
        else:
            fn = None
        if fn is None:
            self._bad_access("write", offset, size, value)
            return
        fn(value)

    def _bad_access(self, kind: str, offset: int, size: int, value: int) -> int:
        self.bad_access_count += 1
        self.bad_accesses.append(BadAccess(kind, offset, size, value))
        self._guest_log("ITS: unsupported %d-byte %s at %s (value %#x): %s", size, kind,
                        R.register_name(offset) if isinstance(offset, int) else offset,
                        value, "reads as 0" if kind == "read" else "ignored")
        return 0

    def _guest_log(self, msg: str, *args) -> None:
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning(msg, *args)
            if self._log_budget == 0:
                log.warning("ITS: further guest errors are counted, not logged")

    def _write_ro(self, value: int) -> None:
        self.ro_writes += 1

    # -- GITS_CTLR -----------------------------------------------------------------------------
    def _read_ctlr(self) -> int:
        self._poll()
        # KVM reports Quiescent whenever the queue is empty (the architecture leaves it
        # UNKNOWN while Enabled == 1, so this is a valid choice in both states).
        reg = R.GITS_CTLR_QUIESCENT if self._creadr == self._cwriter else 0
        return reg | (R.GITS_CTLR_ENABLED if self._enabled else 0)

    def _write_ctlr(self, value: int) -> None:
        enable = bool(value & R.GITS_CTLR_ENABLED)
        if enable and not self._enabled and not (
                self._baser[0] & R.GITS_BASER_VALID and self._baser[1] & R.GITS_BASER_VALID
                and self._cbaser & R.GITS_CBASER_VALID):
            # Enabling without valid tables and queue is UNPREDICTABLE; KVM ignores the write.
            self.enable_refused += 1
            self._guest_log("ITS: GITS_CTLR.Enabled=1 ignored: GITS_BASER0/1 or GITS_CBASER "
                            "not Valid")
            return
        self._enabled = enable
        self.process_commands()

    # -- GITS_CBASER ---------------------------------------------------------------------------
    def _sanitise(self, value: int, inner_shift: int, outer_shift: int, share_shift: int) -> int:
        """KVM's rewriting of reserved or unsupported memory attributes."""
        if (value >> share_shift) & 3 == R.SHARE_OUTER:
            value = (value & ~(3 << share_shift)) | (R.SHARE_INNER << share_shift)
        if (value >> inner_shift) & 7 in (R.CACHE_nCnB, R.CACHE_nC):
            value = (value & ~(7 << inner_shift)) | (R.CACHE_RaWb << inner_shift)
        if (value >> outer_shift) & 7 not in (R.CACHE_SAME_AS_INNER, R.CACHE_nC):
            value &= ~(7 << outer_shift)
        return value

    def _write_cbaser(self, value: int) -> None:
        if self._enabled:
            # Read-only while the ITS is enabled (as KVM and QEMU choose).
            self.ro_writes += 1
            return
        cfg = self.config
        if cfg.sanitise_attributes:
            value = self._sanitise(value, R.GITS_CBASER_INNERCACHE_SHIFT,
                                   R.GITS_CBASER_OUTERCACHE_SHIFT, R.GITS_CBASER_SHAREABILITY_SHIFT)
        if cfg.cbaser_64k_aligned:
            value &= ~0xF000
        if not cfg.keep_res0_bits:
            value &= R.GITS_CBASER_DEFINED
        self._cbaser = value
        self._cq_base = value & R.GITS_CBASER_ADDR_MASK
        self._cq_valid = bool(value & R.GITS_CBASER_VALID)
        self._cq_size = ((value & R.GITS_CBASER_SIZE_MASK) + 1) * 4096
        # A GITS_CBASER write clears GITS_CREADR (IHI 0069, GITS_CREADR); CWRITER is
        # UNKNOWN after it, and set equal to CREADR (KVM) so the queue starts empty.
        self._creadr = 0
        self._cwriter = 0
        self._stalled = False
        self._queue_invalid = False

    # -- GITS_CWRITER / GITS_CREADR ------------------------------------------------------------
    def _write_cwriter(self, value: int) -> None:
        offset = value & R.GITS_CMD_OFFSET_MASK
        if offset >= self._cq_size:
            # IHI 0069, GITS_CWRITER: a value outside the queue is CONSTRAINED UNPREDICTABLE:
            # either the queue is considered invalid and nothing is processed until GITS_CWRITER
            # is written in range (STOP_QUEUE), or the value is treated as a valid UNKNOWN
            # value. KVM drops the write altogether (IGNORE_WRITE): CWRITER keeps its value.
            self._guest_log("ITS: GITS_CWRITER offset %#x beyond the %d-byte queue", offset,
                            self._cq_size)
            if self.config.cwriter_out_of_range is CwriterOutOfRange.STOP_QUEUE:
                self._cwriter = offset
                self._queue_invalid = True
            return
        self._cwriter = offset
        self._queue_invalid = False
        if value & R.GITS_CWRITER_RETRY and self._stalled:
            # Retry restarts a queue stalled by a command error: the command at GITS_CREADR
            # is executed again (and stalls again if it still fails).
            self._stalled = False
        self.process_commands()

    def _read_creadr(self) -> int:
        self._poll()
        return self._creadr | (R.GITS_CREADR_STALLED if self._stalled else 0)

    def _poll(self) -> None:
        """A guest polling GITS_CREADR/GITS_CTLR for completion gets the next budget's worth
        of commands processed, so a bounded budget never strands a guest."""
        if self._creadr != self._cwriter and self._enabled and not self._stalled:
            self.process_commands()

    # -- GITS_BASER<n> -------------------------------------------------------------------------
    def _fix_page_size(self, value: int) -> int:
        page = R.PAGE_SIZE_DECODING[(value >> R.GITS_BASER_PAGE_SIZE_SHIFT) & 3]
        encoding = (value >> R.GITS_BASER_PAGE_SIZE_SHIFT) & 3
        if page not in self.config.page_sizes or encoding == 3:
            # An unsupported (or the reserved) Page_Size reads back as the size in use:
            # the first supported one (KVM: always 64K).
            page = self.config.page_sizes[0]
            value = ((value & ~R.GITS_BASER_PAGE_SIZE_MASK)
                     | (R.PAGE_SIZE_ENCODING[page] << R.GITS_BASER_PAGE_SIZE_SHIFT))
        return value

    def _baser_value(self, n: int, value: int) -> int:
        """What GITS_BASER<n> holds after a write of `value` (n = 2..7: RAZ/WI, Type = 0)."""
        if n > 1:
            return 0
        table_type = R.GITS_BASER_TYPE_DEVICE if n == 0 else R.GITS_BASER_TYPE_COLLECTION
        value &= ~R.GITS_BASER_RO_MASK
        if n == 1 and not self.config.collection_indirect:
            value &= ~R.GITS_BASER_INDIRECT
        value |= ((abi.ABI_REV0_ENTRY_SIZE - 1) << R.GITS_BASER_ENTRY_SIZE_SHIFT
                  | table_type << R.GITS_BASER_TYPE_SHIFT)
        if self.config.sanitise_attributes:
            value = self._sanitise(value, R.GITS_BASER_INNERCACHE_SHIFT,
                                   R.GITS_BASER_OUTERCACHE_SHIFT, R.GITS_BASER_SHAREABILITY_SHIFT)
        return self._fix_page_size(value)

    def _write_baser(self, n: int, value: int) -> None:
        if n > 1:
            return                      # no table of that kind: RAZ/WI (Type = 0)
        if self._enabled:
            self.ro_writes += 1         # ignored while enabled (KVM)
            return
        value = self._baser_value(n, value)
        self._baser[n] = value
        geometry = R.decode_baser(value)
        if n == 0:
            self._dt = geometry
        else:
            self._ct = geometry
        if not value & R.GITS_BASER_VALID and self.config.baser_invalid_forgets:
            # KVM frees every device (BASER0) or collection (BASER1) when the table goes
            # invalid: the memory behind them is no longer the ITS's.
            if n == 0 and self._devices:
                for devid in list(self._devices):
                    self._free_device(devid, self._devices[devid])
                self._mapping_changed("BASER")
            elif n == 1 and (self._collections or self._placeholders):
                for icid in sorted(set(self._collections) | self._placeholders):
                    self._unmap_collection(icid)
                self._mapping_changed("BASER")

    # ==========================================================================================
    # command queue
    # ==========================================================================================
    def process_commands(self, budget: int | None = None) -> int:
        """Execute queued commands (at most `budget`, default ItsConfig.command_budget).

        Returns how many were executed. Does nothing while disabled, stalled, re-entered
        from a sink or observer, or while the queue is invalid."""
        if (self._creadr == self._cwriter or not self._enabled or self._stalled
                or self._queue_invalid or self._processing or not self._cq_valid):
            return 0
        if budget is None:
            budget = self.config.command_budget
        self._processing = True
        done = 0
        # A command that walks ITEs (a MAPC re-targeting or orphaning a collection, a MAPD
        # freeing a device) counts each of them against the budget too, so one GITS_CWRITER
        # write or GITS_CREADR read does bounded work whatever the queue holds (ItsConfig).
        self._work = 0
        try:
            mem = self.memory
            handlers = self._handlers
            unknown = self._cmd_unknown
            unpack = C.COMMAND.iter_unpack
            observers = self.command_observers
            qsize = self._cq_size
            while self._creadr != self._cwriter and done + self._work < budget and not self._stalled:
                creadr = self._creadr
                end = self._cwriter if self._cwriter > creadr else qsize
                count = min((end - creadr) // R.ITS_CMD_SIZE, budget - done - self._work)
                try:
                    block = mem.read(self._cq_base + creadr, count * R.ITS_CMD_SIZE)
                except GuestMemoryError:
                    block = None
                if block is None:
                    # Part of the run is outside RAM: go one command at a time to find it.
                    count = 1
                    try:
                        block = mem.read(self._cq_base + creadr, R.ITS_CMD_SIZE)
                    except GuestMemoryError:
                        # KVM skips a command it cannot read (IHI 0069: an ITS may ignore
                        # it); with STALL the queue stops in front of it.
                        dws = (0, 0, 0, 0)
                        self._command_failed(C.E_ITS_CMDQ_READ_FAULT, creadr, -1, dws)
                        if observers:
                            self._notify_command(creadr, -1, dws, C.E_ITS_CMDQ_READ_FAULT)
                        if self._stall:
                            self._stalled = True
                            break
                        self._advance(creadr, qsize)
                        done += 1
                        continue
                for dws in unpack(block):
                    cmd = dws[0] & COMMAND_NUMBER_MASK
                    err = handlers.get(cmd, unknown)(*dws)
                    if err:
                        self._command_failed(err, self._creadr, cmd, dws)
                        if self._stall:
                            self._stalled = True
                            if observers:
                                self._notify_command(self._creadr, cmd, dws, err)
                            break
                    if observers:
                        self._notify_command(self._creadr, cmd, dws, err)
                    self._advance(self._creadr, qsize)
                    done += 1
                    if self._work and done + self._work >= budget:
                        break           # the block's other commands wait for the next call
        finally:
            self._processing = False
            self.commands_processed += done
        return done

    def _advance(self, creadr: int, qsize: int) -> None:
        creadr += R.ITS_CMD_SIZE
        self._creadr = 0 if creadr >= qsize else creadr

    def _notify_command(self, offset: int, cmd: int, dws: tuple, err: int) -> None:
        record = C.CommandRecord(offset, cmd, tuple(dws), err, bool(err) and self._stall)
        for fn in self.command_observers:
            fn(record)

    def _command_failed(self, code: int, offset: int, cmd: int, dws: tuple) -> None:
        self.error_counts[code] = self.error_counts.get(code, 0) + 1
        if self.error_log.maxlen:
            self.error_log.append(CommandError(code, offset, cmd, tuple(dws)))
        self._guest_log("ITS: command %s at queue offset %#x failed: %s (%#08x)%s",
                        C.command_name(cmd) if cmd >= 0 else "<unreadable>", offset,
                        C.error_name(code), code, ", queue stalled" if self._stall else "")

    # -- helpers shared by the handlers ---------------------------------------------------------
    def _mapping_changed(self, kind: str, devid: int = -1, eventid: int = -1,
                         icid: int = -1) -> None:
        self.generation += 1
        if self.mapping_observers:
            change = MappingChange(kind, devid, eventid, icid, self.generation)
            for fn in self.mapping_observers:
                fn(change)

    def _index_add(self, icid: int, key: tuple[int, int]) -> None:
        members = self._by_icid.get(icid)
        if members is None:
            self._by_icid[icid] = {key}
        else:
            members.add(key)

    def _index_remove(self, icid: int, key: tuple[int, int]) -> None:
        members = self._by_icid.get(icid)
        if members is not None:
            members.discard(key)
            if not members:
                del self._by_icid[icid]

    def _remove_ite(self, devid: int, dev: _Device, eventid: int) -> None:
        intid, icid = dev.events.pop(eventid)
        self._ite_count -= 1
        self._index_remove(icid, (devid, eventid))
        self.sink.unmapped(intid, self._collections.get(icid))

    def _free_device(self, devid: int, dev: _Device) -> None:
        self._work += len(dev.events)
        for eventid in list(dev.events):
            self._remove_ite(devid, dev, eventid)
        del self._devices[devid]

    def _members(self, icid: int) -> list[tuple[int, int, int]]:
        """(devid, eventid, intid) of the ITEs naming `icid`. In the index's order, which the
        same history of commands makes the same (int tuples hash alike in every run); sorting
        was most of a MAPC's cost with 2^16 ITEs. Each ITE counts against the command budget."""
        devices = self._devices
        members = self._by_icid.get(icid, ())
        self._work += len(members)
        return [(devid, eventid, devices[devid].events[eventid][0]) for devid, eventid in members]

    def _unmap_collection(self, icid: int) -> None:
        """Forget collection `icid` (MAPC V=0, or its table made invalid)."""
        # The ITEs stay (KVM: their collection pointer becomes NULL; a physical ITS keeps the
        # ICID), and with them KVM's interrupt of each LPI, target and pending state included:
        # nothing for the sink.
        self._collections.pop(icid, None)
        self._placeholders.discard(icid)
        members = self._members(icid)
        if self._orphan_on_unmap and members:
            orphan = icid | _ORPHAN
            for devid, eventid, intid in members:
                self._devices[devid].events[eventid] = (intid, orphan)
                self._index_add(orphan, (devid, eventid))
            del self._by_icid[icid]

    def _release_all(self) -> None:
        """Tell the sink that every ITE goes (reset, load_state, restore_tables)."""
        for intid, target in list(self.ite_lpis()):
            self.sink.unmapped(intid, target)

    def _lookup(self, cmd: int, devid: int, eventid: int):
        """The checks INT, CLEAR, INV, MOVI and DISCARD share: (error, device, ITE)."""
        e_devid, e_unmapped, e_event, e_ite, _ = C.lookup_errors(cmd)
        if devid >> self._devbits:
            return e_devid, None, None
        dev = self._devices.get(devid)
        if dev is None:
            return e_unmapped, None, None
        if eventid >> dev.size_bits:
            return e_event, dev, None
        ite = dev.events.get(eventid)
        if ite is None:
            return e_ite, dev, None
        return 0, dev, ite

    def _collection_in_table(self, icid: int) -> bool:
        # CIL = 0: 16-bit ICIDs; the ICID's entry must exist in the collection table.
        return abi.table_entry_address(self.memory, self._ct, icid, 16) is not None

    # -- one handler per command ------------------------------------------------------------------
    def _cmd_mapd(self, devid: int, size_bits: int, itt_addr: int, valid: int) -> int:
        entry = abi.table_entry_address(self.memory, self._dt, devid, self._devbits)
        if entry is None:
            return C.E_ITS_MAPD_DEVICE_OOR
        if valid and size_bits > self.config.idbits:
            return C.E_ITS_MAPD_ITTSIZE_OOR
        dev = self._devices.get(devid)
        if dev is not None:
            if (valid and self.config.mapd_remap is MapdRemap.KEEP_SAME_ITT
                    and dev.itt_addr == itt_addr):
                # Same ITT: its entries are still there; those beyond the new size are not
                # reachable any more.
                for eventid in [e for e in dev.events if e >> size_bits]:
                    self._remove_ite(devid, dev, eventid)
                dev.size_bits = size_bits
                self._mapping_changed("MAPD", devid)
                return 0
            # KVM: re-mapping (or unmapping) a device frees its ITEs.
            self._free_device(devid, dev)
        if valid:
            self._devices[devid] = _Device(itt_addr, size_bits)
        elif self.config.zero_freed_entries:
            self._zero_entry(entry)             # KVM: also for a device that was not mapped
        if valid or dev is not None:
            self._mapping_changed("MAPD", devid)
        return 0

    def _cmd_mapc(self, icid: int, target: int, valid: int) -> int:
        if target >= self.redistributors.nr_vcpus and (valid or self.config.mapc_unmap_checks_target):
            return C.E_ITS_MAPC_PROCNUM_OOR     # for V=0 too before Linux 6.7 (ItsConfig)
        if not valid:
            if icid in self._collections or icid in self._placeholders:
                self._unmap_collection(icid)
                self._mapping_changed("MAPC", icid=icid)
            return 0
        old = self._collections.get(icid)
        if old is not None:
            self._collections[icid] = target
            for _, _, intid in self._members(icid):
                # KVM re-applies the collection's target to every LPI it holds, also when the
                # target is the same (update_affinity_collection): that undoes a MOVALL
                self.sink.move(intid, old, target)
            if old != target:
                self._mapping_changed("MAPC", icid=icid)
            return 0
        if icid not in self._placeholders and not self._collection_in_table(icid):
            return C.E_ITS_MAPC_COLLECTION_OOR
        self._placeholders.discard(icid)
        self._collections[icid] = target
        for _, _, intid in self._members(icid):
            # the collection KVM created without a target (MAPTI) gets one, and every LPI it
            # holds moves there (update_affinity_collection), one created targetless included
            self.sink.move(intid, target, target)
        self._mapping_changed("MAPC", icid=icid)
        return 0

    def _map_interrupt(self, kind: str, errors: tuple, devid: int, eventid: int, intid: int,
                       icid: int) -> int:
        e_devid, e_coll, e_unmapped, e_event, e_intid = errors
        if devid >> self._devbits:
            return e_devid
        dev = self._devices.get(devid)
        if dev is None:
            return e_unmapped
        if eventid >> dev.size_bits:
            return e_event
        if intid < R.LPI_BASE or intid >= self.redistributors.lpi_intid_limit():
            return e_intid
        old = dev.events.get(eventid)
        if old is not None and self.config.mapti_overwrite is MaptiOverwrite.KEEP_OLD:
            return 0                    # UNPREDICTABLE; KVM keeps the existing ITE
        if icid not in self._collections and icid not in self._placeholders:
            if not self._collection_in_table(icid):
                return e_coll
        if old is None and self._ite_count >= self.config.max_ites:
            return C.E_ITS_OUT_OF_RESOURCES
        if icid not in self._collections:
            # KVM creates a collection without a target; MAPC maps it later.
            self._placeholders.add(icid)
        if old is not None:
            self._remove_ite(devid, dev, eventid)
        dev.events[eventid] = (intid, icid)
        self._ite_count += 1
        self._index_add(icid, (devid, eventid))
        self.sink.mapped(intid, self._collections.get(icid))
        self._mapping_changed(kind, devid, eventid, icid)
        return 0

    _MAPTI_ERRORS = (C.E_ITS_MAPTI_DEVICE_OOR, C.E_ITS_MAPTI_COLLECTION_OOR,
                     C.E_ITS_MAPTI_UNMAPPED_DEVICE, C.E_ITS_MAPTI_ID_OOR,
                     C.E_ITS_MAPTI_PHYSICALID_OOR)
    _MAPI_ERRORS = (C.E_ITS_MAPI_DEVICE_OOR, C.E_ITS_MAPI_COLLECTION_OOR,
                    C.E_ITS_MAPI_UNMAPPED_DEVICE, C.E_ITS_MAPI_ID_OOR,
                    C.E_ITS_MAPI_PHYSICALID_OOR)

    def _cmd_mapti(self, devid: int, eventid: int, intid: int, icid: int) -> int:
        return self._map_interrupt("MAPTI", self._MAPTI_ERRORS, devid, eventid, intid, icid)

    def _cmd_mapi(self, devid: int, eventid: int, icid: int) -> int:
        # MAPI is MAPTI with pINTID = EventID (IHI 0069 5.3.10)
        return self._map_interrupt("MAPI", self._MAPI_ERRORS, devid, eventid, eventid, icid)

    def _cmd_movi(self, devid: int, eventid: int, icid: int) -> int:
        err, dev, ite = self._lookup(C.GITS_CMD_MOVI, devid, eventid)
        if err:
            return err
        intid, old_icid = ite
        old_target = self._collections.get(old_icid)
        if old_target is None:
            return C.E_ITS_MOVI_UNMAPPED_COLLECTION     # the ITE's own collection (KVM)
        new_target = self._collections.get(icid)
        if new_target is None:
            return C.E_ITS_MOVI_UNMAPPED_COLLECTION
        # KVM sets the LPI's target whatever it was (update_affinity_ite): also to the vCPU the
        # ITE already names, which undoes a MOVALL or brings back an LPI another ITE moved
        self.sink.move(intid, old_target, new_target)
        if icid != old_icid:
            dev.events[eventid] = (intid, icid)
            self._index_remove(old_icid, (devid, eventid))
            self._index_add(icid, (devid, eventid))
            self._mapping_changed("MOVI", devid, eventid, icid)
        return 0

    def _cmd_movall(self, target1: int, target2: int) -> int:
        nr = self.redistributors.nr_vcpus
        if target1 >= nr or target2 >= nr:
            return C.E_ITS_MOVALL_PROCNUM_OOR
        if target1 != target2:
            self.sink.move_all(target1, target2)
            self._mapping_changed("MOVALL")
        return 0

    def _cmd_discard(self, devid: int, eventid: int) -> int:
        err, dev, ite = self._lookup(C.GITS_CMD_DISCARD, devid, eventid)
        if err:
            return err
        target = self._collections.get(ite[1])
        if target is None:
            # KVM refuses (and keeps the ITE) when its collection is not mapped; a physical
            # ITS needs the target Redistributor to remove the pending state.
            return C.E_ITS_DISCARD_UNMAPPED_COLLECTION
        if self.config.discard_clears_pending:
            self.sink.clear_pending(ite[0], target)
        self._remove_ite(devid, dev, eventid)
        if self.config.zero_freed_entries:
            self._zero_entry(dev.itt_addr + eventid * abi.ABI_REV0_ENTRY_SIZE)
        self._mapping_changed("DISCARD", devid, eventid, ite[1])
        return 0

    def _zero_entry(self, gpa: int) -> None:
        """Write zero over a table entry of the ITS's, as KVM does on MAPD V=0 and DISCARD
        (ItsConfig.zero_freed_entries). An entry outside guest RAM: the command still succeeds
        (KVM's write fails, and command errors are silent)."""
        try:
            self.memory.write(gpa, bytes(abi.ABI_REV0_ENTRY_SIZE))
        except GuestMemoryError:
            self.zero_write_faults += 1

    def _cmd_int(self, devid: int, eventid: int) -> int:
        err, _, ite = self._lookup(C.GITS_CMD_INT, devid, eventid)
        if err:
            return err
        target = self._collections.get(ite[1])
        if target is None:
            return C.E_ITS_INT_UNMAPPED_COLLECTION
        self.sink.set_pending(ite[0], target)
        return 0

    def _cmd_clear(self, devid: int, eventid: int) -> int:
        err, _, ite = self._lookup(C.GITS_CMD_CLEAR, devid, eventid)
        if err:
            return err
        target = self._collections.get(ite[1])
        if target is None:
            if self.config.strict_collection_checks:
                return C.E_ITS_CLEAR_UNMAPPED_COLLECTION
            # KVM accepts it and clears the LPI's pending latch all the same, wherever the LPI
            # is (vgic_its_cmd_handle_clear looks up the ITE only; seen on 6.1, differential
            # seed 889): the sink is told, without a target
            self.targetless_commands += 1
        self.sink.clear_pending(ite[0], target)
        return 0

    def _cmd_inv(self, devid: int, eventid: int) -> int:
        err, _, ite = self._lookup(C.GITS_CMD_INV, devid, eventid)
        if err:
            return err
        target = self._collections.get(ite[1])
        if target is None:
            if self.config.strict_collection_checks:
                return C.E_ITS_INV_UNMAPPED_COLLECTION
            # as CLEAR: KVM re-reads the LPI's configuration (update_lpi_config on the ITE's irq)
            self.targetless_commands += 1
        self.sink.invalidate(ite[0], target)
        return 0

    def _cmd_invall(self, icid: int) -> int:
        target = self._collections.get(icid)
        if target is None:
            return C.E_ITS_INVALL_UNMAPPED_COLLECTION
        self.sink.invalidate_all(target)
        return 0

    def _cmd_sync(self, rdbase: int) -> int:
        # Every command takes effect before the next one starts: SYNC has nothing to wait
        # for. (KVM does not check its RDbase either.)
        return 0

    def _cmd_unknown(self, dw0: int, dw1: int, dw2: int, dw3: int) -> int:
        return C.E_ITS_UNKNOWN_COMMAND

    # ==========================================================================================
    # translation
    # ==========================================================================================
    def translate(self, devid: int, eventid: int) -> Translation:
        """What an MSI (devid, eventid) would do now. A query: no side effects, no counting."""
        if not self._enabled:
            return _MISS[MISS_ITS_DISABLED]
        dev = self._devices.get(devid)
        if dev is None:
            return _MISS[MISS_DEVICE_UNMAPPED]
        ite = dev.events.get(eventid)
        if ite is None:
            if eventid >> dev.size_bits:
                return _MISS[MISS_EVENT_OUT_OF_RANGE]
            return _MISS[MISS_NO_ITE]
        target = self._collections.get(ite[1])
        if target is None:
            return _MISS[MISS_COLLECTION_UNMAPPED]
        return Translation(ite[0], ite[1], target, TRANSLATED)

    def signal_msi(self, devid: int, eventid: int) -> bool:
        """A device writes `eventid` to GITS_TRANSLATER: translate and make the LPI pending.

        Returns True when an LPI was made pending. A write that does not translate is
        dropped and counted by reason (IHI 0069: the ITS ignores it)."""
        self.msis += 1
        if self.translation_observers:
            result = self.translate(devid, eventid)
            for fn in self.translation_observers:
                fn(devid, eventid, result)
            if result.reason:
                self.miss_counts[result.reason] += 1
                return False
            self.sink.set_pending(result.intid, result.target)
            self.msis_delivered += 1
            return True
        if not self._enabled:
            self.miss_counts[MISS_ITS_DISABLED] += 1
            return False
        dev = self._devices.get(devid)
        if dev is None:
            self.miss_counts[MISS_DEVICE_UNMAPPED] += 1
            return False
        ite = dev.events.get(eventid)
        if ite is None:
            self.miss_counts[MISS_EVENT_OUT_OF_RANGE if eventid >> dev.size_bits
                             else MISS_NO_ITE] += 1
            return False
        target = self._collections.get(ite[1])
        if target is None:
            self.miss_counts[MISS_COLLECTION_UNMAPPED] += 1
            return False
        self.sink.set_pending(ite[0], target)
        self.msis_delivered += 1
        return True

    def live_mappings(self):
        """Yield (devid, eventid, intid, icid, target) of every ITE that translates now
        (ignoring GITS_CTLR.Enabled): what a delivery engine mirrors."""
        colls = self._collections
        for devid, dev in self._devices.items():
            for eventid, (intid, icid) in dev.events.items():
                target = colls.get(icid)
                if target is not None:
                    yield devid, eventid, intid, icid, target

    def replay_mappings(self) -> int:
        """Tell the sink `mapped` for every ITE, with its target or None (after load_state/restore_tables into a fresh sink, as KVM's restore creates
        each LPI from its ITE). Returns how many."""
        n = 0
        for intid, target in self.ite_lpis():
            self.sink.mapped(intid, target)
            n += 1
        return n

    def ite_lpis(self):
        """Yield (intid, target or None) of every ITE, translating or not: what KVM holds an
        interrupt for (the LpiSink's mapped/unmapped)."""
        colls = self._collections
        for dev in self._devices.values():
            for intid, icid in dev.events.values():
                yield intid, colls.get(icid)

    # ==========================================================================================
    # dump, save, load
    # ==========================================================================================
    def dump(self, *, include_orphans: bool = True) -> dict:
        """The mapping state in canonical form (abi.canonical_dump): devices with their ITT
        address, EventID bits and ITEs, and the mapped collections' targets.

        `include_orphans=False` leaves out the orphaned ITEs (orphaned_ites()): what
        save_tables() writes, and what the kernel's KVM_DEV_ARM_ITS_SAVE_TABLES shows."""
        devices = {}
        for devid, dev in self._devices.items():
            devices[devid] = {
                "itt_addr": dev.itt_addr, "size_bits": dev.size_bits,
                "events": {e: {"intid": intid, "icid": icid & 0xFFFF}
                           for e, (intid, icid) in dev.events.items()
                           if include_orphans or not icid & _ORPHAN},
            }
        return abi.canonical_dump(devices, self._collections)

    def orphaned_ites(self) -> tuple[tuple[int, int], ...]:
        """(DeviceID, EventID) of the ITEs whose collection MAPC V=0 unmapped
        (CollectionUnmap.ORPHAN): they exist (MAPTI/MAPI of their EventID change nothing, only
        MAPD frees them) but never translate, and the table ABI cannot express them."""
        return tuple(sorted(key for icid, keys in self._by_icid.items() if icid & _ORPHAN
                            for key in keys))

    def unmapped_collections(self) -> tuple[int, ...]:
        """ICIDs known without a target: KVM's placeholder collections (MAPTI/MAPI named an
        unmapped ICID), saved with RDBase = COLLECTION_NOT_MAPPED."""
        return tuple(sorted(self._placeholders - set(self._collections)))

    def save_state(self) -> dict:
        """The whole model state (registers and mappings) as a JSON-able dict."""
        devices = {}
        for devid, dev in sorted(self._devices.items()):
            devices[str(devid)] = {
                "itt_addr": dev.itt_addr, "size_bits": dev.size_bits,
                "events": {str(e): [intid, icid & 0xFFFF, bool(icid & _ORPHAN)]
                           for e, (intid, icid) in sorted(dev.events.items())},
            }
        return {
            "format": "kvmits-its-model",
            "version": 1,
            "registers": {
                "enabled": self._enabled, "cbaser": self._cbaser, "cwriter": self._cwriter,
                "creadr": self._creadr, "stalled": self._stalled,
                "queue_invalid": self._queue_invalid, "baser": list(self._baser),
            },
            "devices": devices,
            "collections": {str(i): t for i, t in sorted(self._collections.items())},
            "placeholders": sorted(self._placeholders),
            "generation": self.generation,
        }

    def load_state(self, state: dict, *, notify_sink: bool = True) -> None:
        """Replace the model's state by a save_state() dict (validated; ValueError if bad).

        The sink is told `unmapped` for every ITE before and, with notify_sink, `mapped` for
        every ITE after."""
        parsed = _parse_state(state, self.redistributors.nr_vcpus, self.config)
        regs = parsed[0]
        # Only values GITS_BASER<n> can hold, i.e. that a write leaves as they are: a
        # GITS_BASER2..7 that is not zero (RAZ/WI), or a BASER0 whose RO Type says
        # "collections", is no state this ITS can be in (found by tools/fuzz model).
        for n, value in enumerate(regs["baser"]):
            if self._baser_value(n, value) != value:
                raise ValueError(f"ITS state: registers.baser[{n}] = {value:#x} is not a value "
                                 f"GITS_BASER{n} can hold")
        self._release_all()
        regs, devices, collections, placeholders = parsed
        self._init_state()
        self._enabled = regs["enabled"]
        self._baser = list(regs["baser"])
        self._dt = R.decode_baser(self._baser[0])
        self._ct = R.decode_baser(self._baser[1])
        cbaser = regs["cbaser"]
        self._cbaser = cbaser
        self._cq_base = cbaser & R.GITS_CBASER_ADDR_MASK
        self._cq_valid = bool(cbaser & R.GITS_CBASER_VALID)
        self._cq_size = ((cbaser & R.GITS_CBASER_SIZE_MASK) + 1) * 4096
        self._cwriter = regs["cwriter"]
        self._creadr = regs["creadr"]
        self._stalled = regs["stalled"]
        self._queue_invalid = regs["queue_invalid"]
        self._install(devices, collections, placeholders)
        self.generation = max(self.generation, int(state.get("generation", 0)))
        self._mapping_changed("LOAD")
        if notify_sink:
            self.replay_mappings()

    def _install(self, devices: dict, collections: dict, placeholders) -> None:
        self._collections = dict(collections)
        self._placeholders = set(placeholders) - set(collections)
        for devid, (itt_addr, size_bits, events) in devices.items():
            dev = _Device(itt_addr, size_bits)
            self._devices[devid] = dev
            for eventid, (intid, icid, orphan) in events.items():
                key = icid | _ORPHAN if orphan else icid
                dev.events[eventid] = (intid, key)
                self._index_add(key, (devid, eventid))
                self._ite_count += 1
                if not orphan and icid not in collections and self._orphan_on_unmap:
                    # (KVM) an ITE whose ICID has no target names a collection MAPTI made;
                    # with CollectionUnmap.KEEP it may name one MAPC V=0 unmapped, which is
                    # no placeholder (a round trip made it one: found by tools/fuzz model)
                    self._placeholders.add(icid)

    def save_tables(self) -> int:
        """Write the device table, ITTs and collection table into guest memory in KVM's ABI
        rev 0 layout (what KVM_DEV_ARM_ITS_SAVE_TABLES does). Returns bytes written.

        Raises abi.ItsTableError (host API: the kernel returns EINVAL/EFAULT) when an entry
        has no place in the guest's tables."""
        # Orphaned ITEs are written as the kernel writes them: an invalid (zero) entry, still
        # in the `next` chain (vgic_its_save_ite with a NULL collection, Debian 6.1 kernel).
        return abi.write_tables(self.memory, self._baser[0], self._baser[1], self.dump(),
                                self.unmapped_collections(), devbits=self._devbits,
                                invalid_ites=self.orphaned_ites())

    def restore_tables(self, *, notify_sink: bool = True,
                       max_entries: int = abi.DEFAULT_MAX_ENTRIES) -> None:
        """Replace the mappings by what the guest tables hold (KVM_DEV_ARM_ITS_RESTORE_TABLES).

        Registers are left as they are: restore them first (GITS_BASER0/1 say where the
        tables are). Raises abi.ItsTableError, and then changes nothing, when the tables are
        inconsistent the way the kernel would refuse them."""
        content = abi.read_tables(self.memory, self._baser[0], self._baser[1],
                                  nr_vcpus=self.redistributors.nr_vcpus,
                                  max_entries=max_entries, devbits=self._devbits,
                                  idbits=self.config.idbits)
        dump = content.dump
        devices = {}
        count = 0
        for devid, dev in dump["devices"].items():
            events = {e: (ite["intid"], ite["icid"], False) for e, ite in dev["events"].items()}
            count += len(events)
            devices[devid] = (dev["itt_addr"], dev["size_bits"], events)
        if count > self.config.max_ites:
            raise abi.ItsTableError(f"{count} ITEs exceed the model's limit ({self.config.max_ites})")
        self._release_all()
        self._devices = {}
        self._by_icid = {}
        self._ite_count = 0
        self._install(devices, dump["collections"], content.unmapped_collections)
        self._mapping_changed("RESTORE")
        if notify_sink:
            self.replay_mappings()


def _parse_state(state: dict, nr_vcpus: int, config: ItsConfig):
    """Validate a save_state() dict; returns (registers, devices, collections, placeholders)."""
    def integer(value, what, lo=0, hi=(1 << 64) - 1):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"ITS state: {what} must be an integer in [{lo}, {hi}], got {value!r}")
        return value

    def boolean(value, what):
        if not isinstance(value, bool):
            raise ValueError(f"ITS state: {what} must be a bool, got {value!r}")
        return value

    if not isinstance(state, dict) or state.get("format") != "kvmits-its-model":
        raise ValueError("ITS state: not a kvmits-its-model dict")
    if state.get("version") != 1:
        raise ValueError(f"ITS state: unsupported version {state.get('version')!r}")
    regs_in = state.get("registers")
    if not isinstance(regs_in, dict):
        raise ValueError("ITS state: 'registers' missing")
    baser = regs_in.get("baser")
    if not isinstance(baser, list) or len(baser) != R.GITS_BASER_COUNT:
        raise ValueError("ITS state: registers.baser must be a list of 8 integers")
    regs = {
        "enabled": boolean(regs_in.get("enabled"), "registers.enabled"),
        "cbaser": integer(regs_in.get("cbaser"), "registers.cbaser"),
        "cwriter": integer(regs_in.get("cwriter"), "registers.cwriter", 0, R.GITS_CMD_OFFSET_MASK),
        "creadr": integer(regs_in.get("creadr"), "registers.creadr", 0, R.GITS_CMD_OFFSET_MASK),
        "stalled": boolean(regs_in.get("stalled"), "registers.stalled"),
        "queue_invalid": boolean(regs_in.get("queue_invalid"), "registers.queue_invalid"),
        "baser": [integer(b, f"registers.baser[{n}]") for n, b in enumerate(baser)],
    }
    if regs["cwriter"] & 0x1F or regs["creadr"] & 0x1F:
        raise ValueError("ITS state: CREADR/CWRITER must be 32-byte aligned offsets")
    qsize = ((regs["cbaser"] & R.GITS_CBASER_SIZE_MASK) + 1) * 4096
    if regs["creadr"] >= qsize:
        raise ValueError("ITS state: CREADR is beyond the command queue")
    if regs["cwriter"] >= qsize and not regs["queue_invalid"]:
        # only CwriterOutOfRange.STOP_QUEUE keeps such a GITS_CWRITER, and marks the queue
        # invalid; a runnable queue with it would read commands past the queue's end
        # (found by tools/fuzz model)
        raise ValueError("ITS state: CWRITER is beyond the command queue of a valid queue")
    if regs["queue_invalid"] and regs["cwriter"] < qsize:
        # the queue is invalid only while GITS_CWRITER is beyond it: an invalid queue with an
        # in-range GITS_CWRITER never runs, and a guest polling GITS_CREADR waits for ever
        # (found by tools/fuzz model)
        raise ValueError("ITS state: queue_invalid with CWRITER inside the command queue")

    def keyed(mapping, what):
        if not isinstance(mapping, dict):
            raise ValueError(f"ITS state: {what} must be a dict")
        out = {}
        for key, value in mapping.items():
            try:
                k = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"ITS state: {what} key {key!r} is not an integer") from None
            if k in out:
                raise ValueError(f"ITS state: {what} key {k} appears twice")
            out[k] = value
        return out

    collections = {}
    for icid, target in keyed(state.get("collections", {}), "collections").items():
        integer(icid, "an ICID", 0, 0xFFFF)
        collections[icid] = integer(target, f"collection {icid} target", 0, nr_vcpus - 1)
    placeholders = state.get("placeholders", [])
    if not isinstance(placeholders, list):
        raise ValueError("ITS state: placeholders must be a list")
    placeholders = [integer(i, "a placeholder ICID", 0, 0xFFFF) for i in placeholders]
    devices = {}
    total = 0
    for devid, dev in keyed(state.get("devices", {}), "devices").items():
        integer(devid, "a DeviceID", 0, (1 << config.devbits) - 1)
        if not isinstance(dev, dict):
            raise ValueError(f"ITS state: device {devid} must be a dict")
        itt_addr = integer(dev.get("itt_addr"), f"device {devid} itt_addr", 0, (1 << 52) - 1)
        size_bits = integer(dev.get("size_bits"), f"device {devid} size_bits", 1, config.idbits)
        events = {}
        for eventid, ite in keyed(dev.get("events", {}), f"device {devid} events").items():
            integer(eventid, f"device {devid} EventID", 0, (1 << size_bits) - 1)
            if not isinstance(ite, (list, tuple)) or len(ite) != 3:
                raise ValueError(f"ITS state: device {devid} event {eventid} must be "
                                 "[intid, icid, orphan]")
            intid = integer(ite[0], "an INTID", R.LPI_BASE, 0xFFFF_FFFF)
            icid = integer(ite[1], "an ICID", 0, 0xFFFF)
            events[eventid] = (intid, icid, boolean(ite[2], "an orphan flag"))
        total += len(events)
        devices[devid] = (itt_addr, size_bits, events)
    if total > config.max_ites:
        raise ValueError(f"ITS state: {total} ITEs exceed the model's limit ({config.max_ites})")
    return regs, devices, collections, placeholders
