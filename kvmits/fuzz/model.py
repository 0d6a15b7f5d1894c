"""A fuzz harness for the ITS model (kvmits.its): `run_one(data)` and `seeded_inputs(seed, n)`.

`run_one` decodes bytes (with `Decoder`, a tiny stand-in for atheris' FuzzedDataProvider, so
that it runs without atheris: the test suite replays the corpus and a seeded slice with it)
into a model configuration (an ItsConfig variant), a vCPU count, an LPI INTID bound, and a
sequence of operations on an ItsModel over a 512 KiB guest RAM (`FuzzMemory`): GITS_* reads
and writes of every width at known and random offsets of both 64 KiB frames, a driver-like
set-up, command-queue contents (well-formed commands from the kvmits.its.commands encoders
with interesting field values, and raw 32-byte commands), GITS_CWRITER moves, scribbles over
the table memory, MSIs by signal_msi and by GITS_TRANSLATER, process_commands with small
budgets, save_tables / restore_tables, save_state / load_state (also of a corrupted state),
and reset. A broken invariant raises AssertionError: that is the fuzzer's crash.

Invariants (checked after every model call; the round trips also at the end of each input):

1. Nothing escapes. No exception leaves mmio_read, mmio_write, signal_msi, process_commands or
   translate (docs/its-model.md, "Hostile guests"); the host APIs raise only what they document:
   save_tables / restore_tables abi.ItsTableError, load_state ValueError, and a failed
   restore_tables or load_state changes nothing (model state, sink).

2. Guest memory: the model touches only memory the guest gave the ITS. `FuzzMemory` refuses
   any access not wholly inside RAM (GuestMemoryError, nothing touched, as kvmits.kvm's
   GuestMemory does) and logs every attempt, refused or not. Precisely:
   - a *read* may be refused (the model must handle it: a command read fault, a missing table
     entry), but every read, refused or not, lies inside the command queue GITS_CBASER
     describes (whole 32-byte commands, never past the queue's end), or is an 8-byte entry of the
     GITS_BASER0/1 tables (flat table, level-1 table, or a level-2 page that a level-1 entry read
     in the same call names), and is at most command_budget * 32 bytes (IHI 0069 5.2: the
     ITS's memory is its tables and its queue);
   - a *write* from a guest access happens only with ItsConfig.zero_freed_entries, one per
     successful MAPD V=0 (8 zero bytes over the device's entry, which the model found in
     RAM, so never refused) and per successful DISCARD (8 zero bytes over that ITE in the
     device's ITT; a refused one is counted in zero_write_faults, as KVM's write fails);
   - save_tables writes only into the device table, the collection table and the ITTs of
     mapped devices, and a refused write makes it raise ItsTableError; restore_tables and
     every other call write nothing.
   "Outside guest RAM" is so never reached: the fake refuses it, and what is checked is that
   the model never *asks* for memory it was not given and handles every refusal.

3. Bounded work: one MMIO access runs at most ItsConfig.command_budget commands, and
   process_commands(b) at most b; commands_processed counts exactly the commands run.

4. GITS_CREADR moves only through processed commands: each command record's offset is
   GITS_CREADR before it, and GITS_CREADR steps by 32 bytes per command run, wrapping at the
   queue's end (IHI 0069, GITS_CREADR); a stalled command (ErrorPolicy.STALL) leaves it and is
   the last; a stalled queue runs again only after GITS_CWRITER.Retry = 1. A GITS_CBASER write
   while disabled resets GITS_CREADR (and GITS_CWRITER, as KVM does) to 0 and runs nothing,
   as does reset(). GITS_CWRITER changes only by software writes of it (or GITS_CBASER). A
   guest polling GITS_CREADR/GITS_CTLR, or writing GITS_CWRITER or GITS_CTLR, while the queue
   can run and is not empty makes progress (the model's budget must never strand a guest).

5. Round trips: save_state -> load_state into a fresh model -> save_state gives the same
   state (the generation may grow) and the same dump; save_tables into clean tables (no
   overlaps, all in RAM) -> restore_tables into a fresh model gives the same
   dump(include_orphans=False).

6. Consistency: the LPI sink hears `mapped`/`unmapped` in pairs, exactly the model's ITEs per
   LPI (docs/its-model.md, LpiSink); every sink call names an existing vCPU and an LPI that an
   ITE names; the model holds only DeviceIDs below 2^Devbits and EventID spaces of at most
   ID_bits (what GITS_TYPER advertises, IHI 0069 GITS_TYPER); the ICID index and ITE count
   agree with the ITEs; signal_msi and GITS_TRANSLATER deliver exactly what the mapping dump
   says (IHI 0069 5.2.1); RO register fields read as the architecture fixes them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

from kvmits.errors import GuestMemoryError
from kvmits.its import abi
from kvmits.its import commands as C
from kvmits.its import registers as R
from kvmits.its.config import (
    CollectionUnmap, CwriterOutOfRange, ErrorPolicy, ItsConfig, MapdRemap, MaptiOverwrite,
)
from kvmits.its.interfaces import RecordingSink, Redistributors
from kvmits.its.model import (
    MISS_COLLECTION_UNMAPPED, MISS_DEVICE_UNMAPPED, MISS_EVENT_OUT_OF_RANGE, MISS_ITS_DISABLED,
    MISS_NO_ITE, ItsModel,
)

# -- the guest's memory map (64 KiB aligned regions, as KVM wants its tables) ----------------
RAM_BASE = 0x4000_0000
RAM_SIZE = 0x80000
RAM_END = RAM_BASE + RAM_SIZE
QUEUE = RAM_BASE
DEVICE_TABLE = RAM_BASE + 0x10000
COLLECTION_TABLE = RAM_BASE + 0x20000
L2_AREA = RAM_BASE + 0x30000             # level-2 device table pages
ITT_AREA = RAM_BASE + 0x50000            # ITTs, 256 B apart

MAX_OPS = 32                             # operations per input: keeps one input ~milliseconds
RESTORE_BUDGET = 256                     # table entries one restore_tables op may walk
ROUND_TRIP_ENTRIES = 2048               # a tables round trip is compared up to this walk
_U64 = (1 << 64) - 1
_ADDR52 = (1 << 52) - 1
_ZERO8 = bytes(8)


class Decoder:
    """Reads the fuzzer's bytes as small integers; past the end everything reads as zero,
    so every input decodes (and a mutation of one byte changes one decision)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return 0

    def uint(self, nbytes: int) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += len(chunk)
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        return (self.byte() if n <= 256 else self.uint(4)) % n

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def value(self, interesting, nbytes: int = 4) -> int:
        """Mostly one of `interesting`, sometimes a raw `nbytes`-byte integer."""
        k = self.byte()
        if k >= 0xF0:
            return self.uint(nbytes)
        return interesting[k % len(interesting)]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk.ljust(n, b"\0")


class FuzzMemory:
    """`size` bytes of guest RAM at `base`, bounds-checked like kvmits.kvm.GuestMemory (a
    refused access touches nothing), logging every access the model asks for as
    (kind, gpa, size, inside, data): data is what an 8-byte read returned or what a write
    wrote. The guest's own stores (poke) are not logged."""

    __slots__ = ("base", "size", "end", "buf", "log")

    def __init__(self, base: int = RAM_BASE, size: int = RAM_SIZE, buf: bytearray | None = None):
        self.base = base
        self.size = size
        self.end = base + size
        self.buf = bytearray(size) if buf is None else buf
        self.log: list[tuple] = []

    def inside(self, gpa: int, size: int) -> bool:
        return size >= 0 and self.base <= gpa and gpa + size <= self.end

    def read(self, gpa: int, size: int) -> bytes:
        if type(gpa) is not int or type(size) is not int:
            raise AssertionError(f"guest memory read with non-integer arguments {gpa!r}, {size!r}")
        if not self.inside(gpa, size):
            self.log.append(("read", gpa, size, False, None))
            raise GuestMemoryError(gpa, max(size, 0))
        off = gpa - self.base
        data = bytes(self.buf[off:off + size])
        self.log.append(("read", gpa, size, True, data if size == 8 else None))
        return data

    def write(self, gpa: int, data: bytes) -> None:
        if type(gpa) is not int:
            raise AssertionError(f"guest memory write at a non-integer address {gpa!r}")
        data = bytes(data)
        if not self.inside(gpa, len(data)):
            self.log.append(("write", gpa, len(data), False, data))
            raise GuestMemoryError(gpa, len(data))
        off = gpa - self.base
        self.buf[off:off + len(data)] = data
        self.log.append(("write", gpa, len(data), True, data))

    # -- the guest's own accesses (not the model's) -------------------------------------------
    def poke(self, gpa: int, data: bytes) -> None:
        """Store as the guest does; the part outside RAM is dropped (the guest cannot store there)."""
        start, end = max(gpa, self.base), min(gpa + len(data), self.end)
        if start < end:
            self.buf[start - self.base:end - self.base] = data[start - gpa:end - gpa]

    def peek_u64(self, gpa: int) -> int | None:
        if not self.inside(gpa, 8):
            return None
        off = gpa - self.base
        return int.from_bytes(self.buf[off:off + 8], "little")

    def zero(self, start: int, end: int) -> None:
        self.buf[start - self.base:end - self.base] = bytes(end - start)

    def copy(self) -> "FuzzMemory":
        return FuzzMemory(self.base, self.size, bytearray(self.buf))


class CheckingSink(RecordingSink):
    """A RecordingSink that checks each call's arguments: targets are vCPUs that exist (or None
    where the interface allows it), and every call but `mapped` is about an LPI some ITE
    names (KVM has an interrupt for an LPI only while an ITE names it: vgic_add_lpi /
    its_free_ite). An AssertionError here propagates out of the model: a crash."""

    def __init__(self, nr_vcpus: int):
        super().__init__()
        self.nr_vcpus = nr_vcpus

    def _target(self, call: str, target, none_ok: bool = False) -> None:
        if target is None and none_ok:
            return
        if type(target) is not int or not 0 <= target < self.nr_vcpus:
            raise AssertionError(f"sink.{call}: target {target!r} is not a vCPU "
                                 f"(there are {self.nr_vcpus})")

    def _lpi(self, call: str, intid, live: bool = True) -> None:
        if type(intid) is not int or intid < R.LPI_BASE:
            raise AssertionError(f"sink.{call}: {intid!r} is not an LPI INTID")
        if live and not self.refs.get(intid):
            raise AssertionError(f"sink.{call}: LPI {intid} is named by no ITE")

    def set_pending(self, intid, target):
        self._lpi("set_pending", intid)
        self._target("set_pending", target)
        super().set_pending(intid, target)

    def clear_pending(self, intid, target):
        self._lpi("clear_pending", intid)
        self._target("clear_pending", target, none_ok=True)
        super().clear_pending(intid, target)

    def invalidate(self, intid, target):
        self._lpi("invalidate", intid)
        self._target("invalidate", target, none_ok=True)
        super().invalidate(intid, target)

    def invalidate_all(self, target):
        self._target("invalidate_all", target)
        super().invalidate_all(target)

    def move(self, intid, old_target, new_target):
        self._lpi("move", intid)
        self._target("move", old_target)
        self._target("move", new_target)
        super().move(intid, old_target, new_target)

    def move_all(self, old_target, new_target):
        self._target("move_all", old_target)
        self._target("move_all", new_target)
        if old_target == new_target:
            raise AssertionError(f"sink.move_all({old_target}, {new_target}): not a move")
        super().move_all(old_target, new_target)

    def mapped(self, intid, target):
        self._lpi("mapped", intid, live=False)
        self._target("mapped", target, none_ok=True)
        super().mapped(intid, target)

    def unmapped(self, intid, target):
        self._lpi("unmapped", intid)           # more unmapped than mapped: the pairs broke
        self._target("unmapped", target, none_ok=True)
        super().unmapped(intid, target)


# -- configurations ------------------------------------------------------------------------
BASE_CONFIGS = (ItsConfig(log_limit=0), ItsConfig.spec(log_limit=0),
                ItsConfig.kvm("6.12.118", log_limit=0), ItsConfig.kvm("6.1.100", log_limit=0))
_BOOL_FIELDS = ("collection_indirect", "cbaser_64k_aligned", "keep_res0_bits",
                "sanitise_attributes", "baser_invalid_forgets", "strict_collection_checks",
                "discard_clears_pending", "mapc_unmap_checks_target", "zero_freed_entries")
_ENUM_FIELDS = (("error_policy", ErrorPolicy), ("cwriter_out_of_range", CwriterOutOfRange),
                ("mapti_overwrite", MaptiOverwrite), ("mapd_remap", MapdRemap),
                ("collection_unmap", CollectionUnmap))
_PAGE_SIZES = ((65536,), (4096, 16384, 65536), (4096,), (16384, 4096), (65536, 4096))


def decode_config(d: Decoder) -> ItsConfig:
    """A base configuration (KVM 6.1 / the architecture's / KVM 6.12 / KVM 6.1 before the
    entry zeroing), and with the next byte's bit 0 any field overridden."""
    config = d.pick(BASE_CONFIGS)
    if not d.flag():
        return config
    bools, enums = d.uint(2), d.uint(1)
    over = {name: bool(bools >> n & 1) for n, name in enumerate(_BOOL_FIELDS)}
    for n, (name, kind) in enumerate(_ENUM_FIELDS):
        over[name] = list(kind)[enums >> n & 1]
    over["command_budget"] = d.pick((1, 2, 3, 7, 64, 1024))
    over["max_ites"] = d.pick((0, 1, 3, 64, 1 << 17))
    over["devbits"] = d.pick((16, 1, 4, 9, 13, 16, 20, 32))
    over["idbits"] = d.pick((16, 14, 16, 20, 32))
    over["page_sizes"] = d.pick(_PAGE_SIZES)
    over["error_log_size"] = d.pick((256, 0, 1))
    over["log_limit"] = d.pick((0, 0, 0, 2))
    return dataclasses.replace(config, **over)


LPI_LIMITS = (1 << 16, 1 << 14, 8193 + 7, 1 << 20, 1 << 32)

# offsets a guest (or a confused one) uses: every register and each half of the 64-bit ones
KNOWN_OFFSETS = tuple(sorted({
    R.GITS_CTLR, R.GITS_IIDR, R.GITS_TYPER, R.GITS_TYPER + 4, R.GITS_MPAMIDR, R.GITS_PARTIDR,
    R.GITS_MPIDR, R.GITS_STATUSR, R.GITS_UMSIR, R.GITS_CBASER, R.GITS_CBASER + 4,
    R.GITS_CWRITER, R.GITS_CWRITER + 4, R.GITS_CREADR, R.GITS_CREADR + 4,
    *(R.GITS_BASER0 + 4 * n for n in range(16)), *R.ID_REGISTER_OFFSETS,
    R.GITS_TRANSLATER, R.GITS_TRANSLATER + 2, R.GITS_TRANSLATER + 4, R.ITS_TRANSLATION_FRAME,
    0x1, 0x3, 0x7, 0x84, 0x8C, 0xFFFC, 0xFFFF, 0x1FFFC, 0x20000}))
SIZES = (4, 8, 4, 8, 1, 2, 3, 16)


class _Session:
    """One input: a model, its memory and sink, and the checks around every call."""

    def __init__(self, d: Decoder):
        self.d = d
        self.config = cfg = decode_config(d)
        self.nr_vcpus = 1 + d.below(8)
        self.lpi_limit = d.pick(LPI_LIMITS)
        self.redistributors = Redistributors(self.nr_vcpus, self.lpi_limit)
        flags = d.byte()
        self.msi_observer = bool(flags & 1)
        self.mem = FuzzMemory()
        self.its, self.sink, self.records = self._new_model(self.mem)
        nr, dev_limit, id_limit = self.nr_vcpus, 1 << cfg.devbits, 1 << cfg.idbits
        self.devids = (0, 1, 2, 3, 0, 1, 7, 0x1FF, 0x200, 8191, 8192, 0xFFFF, 0x10000,
                       dev_limit - 1, dev_limit, 0xFFFF_FFFF)
        self.eventids = (0, 1, 2, 3, 0, 1, 5, 31, 32, 0xFF, 0xFFFF, 0x10000, id_limit - 1,
                         0xFFFF_FFFF)
        self.intids = (8192, 8193, 8194, 8195, 8192, 8200, 8191, 0, self.lpi_limit - 1,
                       self.lpi_limit, 0xFFFF, 0xFFFF_FFFF)
        self.icids = (0, 1, 2, 3, 0, 1, 7, 511, 512, 8191, 8192, 0xFFFF)
        self.rdbases = (*range(nr), *range(nr), nr, 0xFFFF, 0xFFFF_FFFF)
        self.size_bits = (1, 2, 3, 4, 5, 1, 2, 8, 16, cfg.idbits, cfg.idbits + 1, 32)
        self.itts = (*(ITT_AREA + 0x100 * k for k in range(8)), ITT_AREA + 0x1000,
                     ITT_AREA + 0x10000, RAM_END - 0x100, RAM_END, QUEUE, DEVICE_TABLE,
                     COLLECTION_TABLE, L2_AREA, 0, _ADDR52 & ~0xFF)
        self.table_bases = (DEVICE_TABLE, COLLECTION_TABLE, L2_AREA, L2_AREA + 0x10000,
                            RAM_END - 0x10000, RAM_END, RAM_BASE - 0x10000, QUEUE, ITT_AREA)
        self.queue_bases = (QUEUE, QUEUE, RAM_END - 0x1000, RAM_END - 0x10000, RAM_END,
                            ITT_AREA, RAM_BASE - 0x1000, 0)
        self.values = (0, 1, 0x20, 0x40, 0x1000, 0xFFE0, 0xFFFE0, 0xFFFE1, 0x21, 0xFFFF_FFFF,
                       _U64, 1 << 63, R.GITS_CTLR_ENABLED,
                       R.encode_cbaser(base=QUEUE, pages=1),
                       R.encode_cbaser(base=QUEUE, pages=2),
                       R.encode_cbaser(base=RAM_END - 0x1000, pages=4),
                       R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_DEVICE,
                                      base=DEVICE_TABLE, pages=1),
                       R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_DEVICE,
                                      base=DEVICE_TABLE, pages=1, indirect=True),
                       R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_COLLECTION,
                                      base=COLLECTION_TABLE, pages=1),
                       R.encode_baser(valid=True, type_=R.GITS_BASER_TYPE_COLLECTION,
                                      base=COLLECTION_TABLE, pages=1, page_size=4096))
        self.table_checks = 0           # tables round trips compared (for tools/fuzz stats)
        if flags & 2:
            # start from a driver's set-up (tables, queue, enable, MAPC n -> n), so that short
            # inputs reach the commands
            self._setup(QUEUE, 1 + (flags >> 2 & 3), DEVICE_TABLE, 1, 65536, bool(flags & 16),
                        COLLECTION_TABLE, 1, 65536, True)
            self._enqueue([C.encode_mapc(n, n) for n in range(self.nr_vcpus)], 8)

    def _new_model(self, mem: FuzzMemory):
        sink = CheckingSink(self.nr_vcpus)
        its = ItsModel(mem, sink, self.redistributors, self.config)
        records: list = []
        its.command_observers.append(records.append)
        if self.msi_observer:
            # an observer makes signal_msi take its general path (through translate)
            its.translation_observers.append(lambda devid, eventid, result: None)
        return its, sink, records

    # ==========================================================================================
    # driving the model
    # ==========================================================================================
    def run(self) -> None:
        d = self.d
        ops = self.OPS
        n = 0
        while d.left() and n < MAX_OPS:
            ops[d.byte() % len(ops)](self)
            self.check_consistency()
            n += 1
        self.state_round_trip(swap=False)
        self.tables_round_trip()

    def op_write_known(self) -> None:
        d = self.d
        self.guest("write", d.pick(KNOWN_OFFSETS), d.pick(SIZES), d.value(self.values, 8),
                   d.value(self.devids))

    def op_write_random(self) -> None:
        d = self.d
        offset = d.uint(3) % 0x20010
        if d.flag():
            offset &= ~3
        self.guest("write", offset, d.pick(SIZES), d.uint(8), 0)

    def op_read(self) -> None:
        d = self.d
        offset = d.pick(KNOWN_OFFSETS) if d.byte() < 0xC0 else d.uint(3) % 0x20010
        self.guest("read", offset, d.pick(SIZES))

    def op_setup(self) -> None:
        d = self.d
        self._setup(d.pick(self.queue_bases), d.pick((1, 1, 2, 16, 256)),
                    d.pick(self.table_bases), d.pick((1, 1, 2, 8, 256)),
                    d.pick((65536, 4096, 16384, 65536)), d.byte() & 3 == 1,
                    d.pick(self.table_bases), d.pick((1, 1, 2, 256)),
                    d.pick((65536, 4096, 65536)), d.byte() != 0xFF)

    def _setup(self, qbase, qpages, dt_base, dt_pages, dt_page, indirect, ct_base, ct_pages,
               ct_page, enable) -> None:
        """A driver's bring-up (IHI 0069 5.1: disable, then GITS_CBASER, GITS_BASER<n>, enable)."""
        g = self.guest
        g("write", R.GITS_CTLR, 4, 0, 0)
        g("write", R.GITS_CBASER, 8, R.encode_cbaser(base=qbase & ~0xFFF, pages=qpages), 0)
        g("write", R.GITS_BASER0, 8, R.encode_baser(
            valid=True, type_=R.GITS_BASER_TYPE_DEVICE, base=dt_base & ~(dt_page - 1),
            pages=dt_pages, page_size=dt_page, indirect=indirect), 0)
        g("write", R.GITS_BASER0 + 8, 8, R.encode_baser(
            valid=True, type_=R.GITS_BASER_TYPE_COLLECTION, base=ct_base & ~(ct_page - 1),
            pages=ct_pages, page_size=ct_page), 0)
        if indirect:
            # a level-1 entry for the first level-2 page, as a driver allocates them
            self.mem.poke(dt_base, abi.encode_l1_entry(L2_AREA).to_bytes(8, "little"))
        if enable:
            g("write", R.GITS_CTLR, 4, R.GITS_CTLR_ENABLED, 0)

    def _command(self) -> bytes:
        d = self.d
        kind = d.below(14)
        if kind == 0:
            return C.encode_mapd(d.value(self.devids), d.value(self.itts, 7),
                                 d.pick(self.size_bits), d.byte() != 0xFF)
        if kind == 1:
            return C.encode_mapc(d.value(self.icids), d.value(self.rdbases), d.byte() < 0xE0)
        if kind in (2, 3):
            return C.encode_mapti(d.value(self.devids), d.value(self.eventids),
                                  d.value(self.intids), d.value(self.icids))
        if kind == 4:
            return C.encode_mapi(d.value(self.devids), d.value(self.eventids + self.intids),
                                 d.value(self.icids))
        if kind == 5:
            return C.encode_movi(d.value(self.devids), d.value(self.eventids),
                                 d.value(self.icids))
        if kind == 6:
            return C.encode_movall(d.value(self.rdbases), d.value(self.rdbases))
        if kind == 7:
            return C.encode_invall(d.value(self.icids))
        if kind == 8:
            return C.encode_sync(d.value(self.rdbases))
        if kind == 13:
            return d.take(32)
        encode = (C.encode_discard, C.encode_int, C.encode_clear, C.encode_inv)[kind - 9]
        return encode(d.value(self.devids), d.value(self.eventids))

    def _enqueue(self, commands: list[bytes], size: int, retry: int = 0) -> None:
        """Store commands at GITS_CWRITER (wrapping at the queue's end) and move GITS_CWRITER
        past them once, as a driver does."""
        its = self.its
        cbaser = its.mmio_read(R.GITS_CBASER, 8)
        base, qsize = cbaser & R.GITS_CBASER_ADDR_MASK, ((cbaser & 0xFF) + 1) * 4096
        cw = its.cwriter
        if cw >= qsize:
            cw = 0
        for cmd in commands:
            self.mem.poke(base + cw, cmd)
            cw = (cw + R.ITS_CMD_SIZE) % qsize
        if size == 8:
            self.guest("write", R.GITS_CWRITER, 8, cw | retry, 0)
        else:
            self.guest("write", R.GITS_CWRITER, 4, cw | retry, 0)

    def op_commands(self) -> None:
        d = self.d
        n = 1 + d.below(8)
        cmds = [self._command() for _ in range(n)]
        flags = d.byte()
        self._enqueue(cmds, 8 if flags & 1 else 4, retry=flags >> 1 & 1)

    def op_cwriter(self) -> None:
        d = self.d
        value = d.value((0, 0x20, 0x40, 0x1000 - 0x20, 0x1000, 0x2000, 0xFFFE0, 1, 0x21), 3)
        if d.flag():
            self.guest("write", R.GITS_CWRITER, 8, value, 0)
        else:
            self.guest("write", R.GITS_CWRITER + 4 * d.flag(), 4, value, 0)

    def op_scribble(self) -> None:
        """The guest stores into memory the ITS uses: table entries, queue slots, garbage."""
        d, mem = self.d, self.mem
        kind = d.below(6)
        if kind == 0:
            mem.poke(d.pick(self.table_bases + self.itts) + d.uint(2) % 0x1000,
                     d.take(1 + d.below(32)))
        elif kind == 1:
            mem.poke(DEVICE_TABLE + 8 * d.below(16), abi.encode_l1_entry(
                d.value((L2_AREA, L2_AREA + 0x10000, L2_AREA + 0x1000, RAM_END, 0), 7),
                valid=d.byte() != 0).to_bytes(8, "little"))
        elif kind == 2:
            dte = abi.encode_dte(d.value(self.itts, 7), d.pick(self.size_bits),
                                 d.value((0, 1, 2, 16, abi.DTE_MAX_NEXT)), d.byte() != 0)
            mem.poke(d.pick((DEVICE_TABLE, L2_AREA)) + 8 * d.value(self.devids[:8], 2),
                     dte.to_bytes(8, "little"))
        elif kind == 3:
            cte = abi.encode_cte(d.value(self.icids), d.value(self.rdbases + (0xFFFF_FFFF,)),
                                 d.byte() != 0)
            mem.poke(COLLECTION_TABLE + 8 * d.below(8), cte.to_bytes(8, "little"))
        elif kind == 4:
            ite = abi.encode_ite(d.value(self.intids), d.value(self.icids),
                                 d.value((0, 1, 2, 5, abi.ITE_MAX_NEXT)))
            mem.poke(d.pick(self.itts) + 8 * d.value(self.eventids[:8], 2),
                     ite.to_bytes(8, "little"))
        else:
            cbaser = self.its.mmio_read(R.GITS_CBASER, 8)
            mem.poke((cbaser & R.GITS_CBASER_ADDR_MASK) + 32 * d.below(256), self._command())

    def op_msi(self) -> None:
        d = self.d
        self.msi(d.value(self.devids), d.value(self.eventids), None)

    def op_translater(self) -> None:
        d = self.d
        self.msi(d.value(self.devids), d.value(self.eventids, 8), d.pick((4, 2, 4, 1, 8)))

    def op_translate(self) -> None:
        d = self.d
        devid, eventid = d.value(self.devids), d.value(self.eventids)
        try:
            got = self.its.translate(devid, eventid)
        except Exception as exc:  # noqa: BLE001 - invariant 1: nothing escapes translate
            raise AssertionError(f"translate({devid:#x}, {eventid:#x}): {type(exc).__name__} "
                                 f"escaped the ITS model: {exc}") from exc
        want = self.expected_translation(devid, eventid)
        if tuple(got) != want:
            raise AssertionError(f"translate({devid:#x}, {eventid:#x}) = {tuple(got)}, "
                                 f"the dump says {want}")

    def op_process(self) -> None:
        d = self.d
        budget = d.pick((1, 2, 3, 8, None))
        if budget is None:
            self.guest("process")
        else:
            self.guest("process", budget)

    def op_reset(self) -> None:
        its = self.its
        cfg_baser = (its.mmio_read(R.GITS_BASER0, 8), its.mmio_read(R.GITS_BASER0 + 8, 8))
        self.records.clear()
        self.host_call("reset", its.reset)
        if (its.enabled or its.creadr or its.cwriter or its.stalled
                or its.mmio_read(R.GITS_CBASER, 8) or its.ite_count or self.sink.refs
                or its.dump() != {"collections": {}, "devices": {}}):
            raise AssertionError("reset: the ITS must be disabled, GITS_CBASER = GITS_CREADR = "
                                 "GITS_CWRITER = 0 and nothing mapped")
        for n, before in enumerate(cfg_baser):
            if its.mmio_read(R.GITS_BASER0 + 8 * n, 8) != before & ~R.GITS_BASER_VALID:
                raise AssertionError(f"reset: GITS_BASER{n} must keep its fields with Valid = 0")
        if self.records:
            raise AssertionError("reset ran commands")

    def op_save_tables(self) -> None:
        """KVM_DEV_ARM_ITS_SAVE_TABLES on the live model: it writes only into its tables."""
        its, mem = self.its, self.mem
        before = its.save_state()
        ncalls = len(self.sink.calls)
        mem.log.clear()
        raised = self.host_call("save_tables", its.save_tables, allowed=abi.ItsTableError)
        refused = [a for a in mem.log if a[0] == "write" and not a[3]]
        if refused and not raised:
            raise AssertionError(f"save_tables: a write outside RAM at {refused[0][1]:#x} "
                                 "did not fail the save")
        regions = [(dev["itt_addr"], dev["itt_addr"] + (8 << dev["size_bits"]))
                   for dev in before["devices"].values()]
        self._check_table_reads_and_writes("save_tables", before["registers"]["baser"], regions)
        if its.save_state() != before or len(self.sink.calls) != ncalls:
            raise AssertionError("save_tables changed the model or told the sink something")

    def op_restore_tables(self) -> None:
        its, mem = self.its, self.mem
        before = its.save_state()
        refs, ncalls = dict(self.sink.refs), len(self.sink.calls)
        mem.log.clear()
        self.records.clear()
        raised = self.host_call("restore_tables", lambda: its.restore_tables(
            max_entries=RESTORE_BUDGET), allowed=abi.ItsTableError)
        if any(a[0] == "write" for a in mem.log):
            raise AssertionError("restore_tables wrote guest memory")
        if any(a[0] == "read" and not 0 < a[2] <= 4096 for a in mem.log):
            raise AssertionError("restore_tables made an unbounded read")
        after = its.save_state()
        if raised:
            if after != before or self.sink.refs != refs or len(self.sink.calls) != ncalls:
                raise AssertionError("a failed restore_tables changed the model or the sink")
        elif after["registers"] != before["registers"] or self.records:
            raise AssertionError("restore_tables changed registers or ran commands")

    def op_state_round_trip(self) -> None:
        self.state_round_trip(swap=self.d.flag())

    def op_load_mutated(self) -> None:
        """load_state of a corrupted state: refused with ValueError and nothing changed, or
        accepted, and then the model obeys every invariant (a snapshot file is host input)."""
        d, its = self.d, self.its
        state = json.loads(json.dumps(its.save_state()))
        regs = state["registers"]
        kind = d.below(9)
        offsets = (0, 0x20, 0x40, 0xFE0, 0x1000, 0x2000, 0xFFFE0, 0x10, 1 << 20, -32)
        if kind == 0:
            regs["cwriter"] = d.value(offsets)
        elif kind == 1:
            regs["creadr"] = d.value(offsets)
        elif kind == 2:
            regs["cbaser"] = d.value(self.values, 8)
        elif kind == 3:
            regs["baser"][d.below(8)] = d.value(self.values, 8)
        elif kind == 4:
            name = d.pick(("enabled", "stalled", "queue_invalid"))
            regs[name] = not regs[name]
        elif kind == 5:
            state["collections"][str(d.value(self.icids))] = d.value(self.rdbases)
        elif kind == 6:
            state["placeholders"].append(d.value(self.icids))
        elif kind == 7:
            state["devices"][str(d.value(self.devids))] = {
                "itt_addr": d.value(self.itts, 7), "size_bits": d.pick(self.size_bits),
                "events": {str(d.value(self.eventids)): [d.value(self.intids),
                                                         d.value(self.icids), d.flag()]}}
        else:
            for dev in state["devices"].values():
                dev["size_bits"] = d.pick(self.size_bits)
        before = its.save_state()
        refs, ncalls = dict(self.sink.refs), len(self.sink.calls)
        self.records.clear()
        raised = self.host_call("load_state", lambda: its.load_state(state), allowed=ValueError)
        if raised and (its.save_state() != before or self.sink.refs != refs
                       or len(self.sink.calls) != ncalls):
            raise AssertionError("a refused load_state changed the model or the sink")
        if self.records:
            raise AssertionError("load_state ran commands")

    def op_tables_round_trip(self) -> None:
        self.tables_round_trip()

    OPS = (op_write_known, op_write_known, op_write_random, op_read, op_read, op_setup,
           op_setup, op_commands, op_commands, op_commands, op_commands, op_commands,
           op_cwriter, op_scribble, op_scribble, op_msi, op_msi, op_translater, op_translate,
           op_process, op_save_tables, op_restore_tables, op_state_round_trip, op_load_mutated,
           op_reset, op_tables_round_trip)

    # ==========================================================================================
    # checked calls
    # ==========================================================================================
    def host_call(self, what: str, fn, allowed=()) -> bool:
        """Call a host API; True if it raised one of the exceptions it documents."""
        try:
            fn()
        except AssertionError:
            raise
        except allowed:
            return True
        except Exception as exc:  # noqa: BLE001 - invariant 1: only documented exceptions
            raise AssertionError(f"{what}: {type(exc).__name__} escaped the ITS model: {exc}") from exc
        return False

    def _snapshot(self) -> tuple:
        its = self.its
        return (its.creadr, its.cwriter, its.stalled, its.enabled, its.commands_processed,
                its.zero_write_faults, its.mmio_read(R.GITS_CBASER, 8),
                its.mmio_read(R.GITS_BASER0, 8), its.mmio_read(R.GITS_BASER0 + 8, 8))

    def guest(self, kind: str, *args):
        """A guest-facing call ("read", "write", "process"), with invariants 1-4 checked."""
        its, mem = self.its, self.mem
        before = self._snapshot()
        # the devices' ITTs before the call, to place DISCARD's zeroing writes (read only)
        itts = ({devid: dev.itt_addr for devid, dev in its._devices.items()}
                if self.config.zero_freed_entries else None)
        self.records.clear()
        mem.log.clear()
        try:
            if kind == "read":
                result = its.mmio_read(*args)
            elif kind == "write":
                result = its.mmio_write(*args)
            else:
                result = its.process_commands(*args)
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - invariant 1: nothing escapes a guest access
            raise AssertionError(f"{kind}{tuple(args)}: {type(exc).__name__} escaped the ITS "
                                 f"model: {exc}") from exc
        self._check_queue(kind, args, before, result)
        if mem.log:
            budget = max(self.config.command_budget, args[0] if kind == "process" and args else 0)
            self._check_guest_memory(before, itts, budget)
        if kind == "read":
            self._check_read(args[0], args[1], result)
        return result

    def _check_queue(self, kind: str, args: tuple, before: tuple, result) -> None:
        its, cfg, recs = self.its, self.config, self.records
        creadr0, cwriter0, stalled0, enabled0, processed0, _, cbaser0, _, _ = before
        qsize = ((cbaser0 & R.GITS_CBASER_SIZE_MASK) + 1) * 4096
        offset = args[0] if kind in ("read", "write") else -1
        size = args[1] if kind in ("read", "write") else 0
        value = args[2] if kind == "write" else 0
        write = kind == "write"
        cbaser_write = write and (offset == R.GITS_CBASER and size in (4, 8)
                                  or offset == R.GITS_CBASER + 4 and size == 4)
        if cbaser_write and not enabled0:
            # IHI 0069, GITS_CREADR: a GITS_CBASER write resets it to 0; GITS_CWRITER too (KVM)
            if recs or its.creadr or its.cwriter or its.stalled:
                raise AssertionError(
                    f"GITS_CBASER write: GITS_CREADR={its.creadr:#x} GITS_CWRITER="
                    f"{its.cwriter:#x} stalled={its.stalled} commands={len(recs)}, "
                    "expected an empty queue at offset 0")
            return
        done = sum(1 for r in recs if not r.stalled)
        limit = args[0] if kind == "process" and args else cfg.command_budget
        if done > limit:
            raise AssertionError(f"{kind}{tuple(args)} ran {done} commands, the budget is {limit}")
        if its.commands_processed - processed0 != done:
            raise AssertionError(f"commands_processed moved by {its.commands_processed - processed0}"
                                 f", {done} commands ran")
        if kind == "process" and result != done:
            raise AssertionError(f"process_commands returned {result}, {done} commands ran")
        expect = creadr0
        for n, r in enumerate(recs):
            if r.offset != expect:
                raise AssertionError(f"command {r.name} ran at queue offset {r.offset:#x}, "
                                     f"GITS_CREADR was {expect:#x}")
            if r.stalled:
                if n != len(recs) - 1 or cfg.error_policy is not ErrorPolicy.STALL or not r.error:
                    raise AssertionError(f"command {r.name} stalled the queue wrongly")
            else:
                expect = (expect + R.ITS_CMD_SIZE) % qsize
        if its.creadr != expect:
            raise AssertionError(f"GITS_CREADR {creadr0:#x} -> {its.creadr:#x} after {done} "
                                 f"commands of a {qsize}-byte queue (expected {expect:#x})")
        if its.creadr % R.ITS_CMD_SIZE or its.creadr >= qsize:
            raise AssertionError(f"GITS_CREADR {its.creadr:#x} is not a command slot of the queue")
        if its.stalled and not stalled0 and not (recs and recs[-1].stalled):
            # (a queue loaded stalled stays so until Retry, whatever the policy)
            raise AssertionError("the queue stalled without a failing command")
        cwriter_write = write and (offset == R.GITS_CWRITER and size in (4, 8)
                                   or offset == R.GITS_CWRITER + 4 and size == 4)
        if stalled0 and done and not (cwriter_write and offset == R.GITS_CWRITER
                                      and value & R.GITS_CWRITER_RETRY):
            raise AssertionError("a stalled queue ran commands without GITS_CWRITER.Retry = 1")
        if its.cwriter != cwriter0 and not cwriter_write:
            raise AssertionError(f"GITS_CWRITER {cwriter0:#x} -> {its.cwriter:#x} by "
                                 f"{kind}{tuple(args)}, not a GITS_CWRITER write")
        requested = (value if offset == R.GITS_CWRITER else cwriter0) & R.GITS_CMD_OFFSET_MASK
        if cwriter_write and requested < qsize and its.cwriter != requested:
            raise AssertionError(f"GITS_CWRITER write of {requested:#x} reads {its.cwriter:#x}")
        # progress: a guest waiting for its commands never waits on the model's budget
        poll = kind == "read" and (offset == R.GITS_CTLR and size == 4
                                   or offset in (R.GITS_CREADR, R.GITS_CREADR + 4) and size == 4
                                   or offset == R.GITS_CREADR and size == 8)
        kick = (cwriter_write and requested < qsize
                or write and offset == R.GITS_CTLR and size == 4)
        if (poll or kick) and not recs and its.creadr != its.cwriter and self._runnable():
            raise AssertionError(f"{kind}{tuple(args)} left {its.pending_commands} commands "
                                 "waiting on a runnable queue")

    def _runnable(self) -> bool:
        its = self.its
        cbaser = its.mmio_read(R.GITS_CBASER, 8)
        return (its.enabled and not its.stalled and bool(cbaser & R.GITS_CBASER_VALID)
                and its.cwriter < ((cbaser & R.GITS_CBASER_SIZE_MASK) + 1) * 4096)

    def _check_read(self, offset: int, size: int, value) -> None:
        """RO fields the architecture (and the model's documented KVM values) fix."""
        if type(value) is not int or not 0 <= value < 1 << (8 * size if size in (4, 8) else 0):
            raise AssertionError(f"{size}-byte read at {offset:#x} returned {value!r}")
        if size not in (4, 8) or offset & (size - 1):
            return
        its = self.its
        want, res0 = None, 0
        if offset == R.GITS_TYPER or offset == R.GITS_TYPER + 4 and size == 4:
            want = R.make_typer(self.config.devbits, self.config.idbits, 8)
        elif offset == R.GITS_IIDR and size == 4:
            want = self.config.iidr
        elif R.GITS_BASER0 + 16 <= offset < R.GITS_BASER0 + 64:
            want = 0                                         # GITS_BASER2..7: no table, RAZ
        elif R.GITS_BASER0 <= offset < R.GITS_BASER0 + 16:
            n = (offset - R.GITS_BASER0) // 8
            baser = its.mmio_read(R.GITS_BASER0 + 8 * n, 8)
            kind = R.GITS_BASER_TYPE_DEVICE if n == 0 else R.GITS_BASER_TYPE_COLLECTION
            fixed = kind << R.GITS_BASER_TYPE_SHIFT | 7 << R.GITS_BASER_ENTRY_SIZE_SHIFT
            if baser & R.GITS_BASER_RO_MASK != fixed:
                raise AssertionError(f"GITS_BASER{n} = {baser:#x}: Type/Entry_Size are RO")
            encoding = baser >> R.GITS_BASER_PAGE_SIZE_SHIFT & 3
            if encoding == 3 or R.PAGE_SIZE_DECODING[encoding] not in self.config.page_sizes:
                raise AssertionError(f"GITS_BASER{n} = {baser:#x}: an unsupported Page_Size")
            want = baser
        elif offset == R.GITS_CREADR and size == 8:
            res0 = value & ~(R.GITS_CMD_OFFSET_MASK | R.GITS_CREADR_STALLED)
        elif offset == R.GITS_CWRITER and size == 8:
            res0 = value & ~R.GITS_CMD_OFFSET_MASK
        elif offset == R.GITS_CTLR and size == 4:
            if bool(value & R.GITS_CTLR_ENABLED) != its.enabled:
                raise AssertionError(f"GITS_CTLR = {value:#x}, Enabled is {its.enabled}")
        if res0:
            raise AssertionError(f"register at {offset:#x} reads {value:#x}: RES0 bits set")
        if want is not None:
            if size == 4:
                # either half of a 64-bit register (IHI 0069: accessible separately)
                want = want >> 32 if offset & 4 and offset != R.GITS_IIDR else want & 0xFFFF_FFFF
            if value != want:
                raise AssertionError(f"{size}-byte read of {R.register_name(offset)} = "
                                     f"{value:#x}, expected {want:#x}")

    def _table_reads_ok(self, gpa: int, size: int, data, tables, l2_pages: set) -> bool:
        """Is this read an 8-byte entry of a GITS_BASER table (recording level-2 pages)?"""
        if size != abi.ABI_REV0_ENTRY_SIZE:
            return False
        for geo in tables:
            if geo.valid and geo.base <= gpa and gpa + size <= geo.base + geo.size:
                if geo.indirect and data is not None:
                    l1 = int.from_bytes(data, "little")
                    if l1 >> 63:
                        page = l1 & _ADDR52 & ~(geo.page_size - 1)
                        l2_pages.add((page, page + geo.page_size))
                return True
        return any(start <= gpa and gpa + size <= end for start, end in l2_pages)

    def _check_guest_memory(self, before: tuple, itts: dict | None, budget: int) -> None:
        cbaser0, baser0, baser1 = before[6:9]
        qbase = cbaser0 & R.GITS_CBASER_ADDR_MASK
        qend = qbase + ((cbaser0 & R.GITS_CBASER_SIZE_MASK) + 1) * 4096
        tables = (R.decode_baser(baser0), R.decode_baser(baser1))
        max_read = budget * R.ITS_CMD_SIZE
        l2_pages: set = set()
        writes = []
        for kind, gpa, size, _inside, data in self.mem.log:
            if kind == "write":
                writes.append((gpa, size, _inside, data))
                continue
            if not 0 < size <= max(max_read, 8):
                raise AssertionError(f"a {size}-byte guest memory read at {gpa:#x}")
            if qbase <= gpa and gpa + size <= qend and not (gpa - qbase) % 32 and not size % 32:
                continue
            if not self._table_reads_ok(gpa, size, data, tables, l2_pages):
                raise AssertionError(f"the model read [{gpa:#x}, {gpa + size:#x}): neither the "
                                     f"command queue [{qbase:#x}, {qend:#x}) nor a table entry")
        if not writes:
            return
        if itts is None:
            raise AssertionError(f"a guest access made the model write guest memory at "
                                 f"{writes[0][0]:#x} (zero_freed_entries is off)")
        expected = []
        for r in self.records:
            if r.error or r.stalled:
                continue
            if r.command == C.GITS_CMD_MAPD:
                f = r.fields
                if f["valid"]:
                    itts[f["devid"]] = f["itt_addr"]
                else:
                    expected.append((r, None))
                    itts.pop(f["devid"], None)
            elif r.command == C.GITS_CMD_DISCARD:
                f = r.fields
                itt = itts.get(f["devid"])
                if itt is None:
                    raise AssertionError(f"DISCARD succeeded on device {f['devid']:#x}, "
                                         "which had no ITT")
                expected.append((r, itt + 8 * f["eventid"]))
        if len(writes) != len(expected):
            raise AssertionError(f"{len(writes)} guest memory writes for {len(expected)} "
                                 "successful MAPD V=0 / DISCARD commands")
        refused = 0
        for (gpa, size, inside, data), (r, ite) in zip(writes, expected, strict=True):
            if data != _ZERO8:
                raise AssertionError(f"{r.name} wrote {data!r} at {gpa:#x}, not a zero entry")
            if ite is None:
                if not inside or not self._table_reads_ok(gpa, 8, None, tables[:1], l2_pages):
                    raise AssertionError(f"MAPD V=0 zeroed {gpa:#x}: not its device table entry")
            elif gpa != ite:
                raise AssertionError(f"DISCARD zeroed {gpa:#x}, its ITE is at {ite:#x}")
            refused += not inside
        if self.its.zero_write_faults - before[5] != refused:
            raise AssertionError(f"{refused} zeroing writes refused, zero_write_faults moved by "
                                 f"{self.its.zero_write_faults - before[5]}")

    def _check_table_reads_and_writes(self, what: str, basers: list, itt_spans: list) -> None:
        tables = (R.decode_baser(basers[0]), R.decode_baser(basers[1]))
        l2_pages: set = set()
        for kind, gpa, size, inside, data in self.mem.log:
            if kind == "read":
                if not self._table_reads_ok(gpa, size, data, tables, l2_pages):
                    raise AssertionError(f"{what} read [{gpa:#x}, {gpa + size:#x}): not a table entry")
                continue
            if not inside:
                continue
            dt = tables[0]
            if size == 8 and (any(s <= gpa and gpa + 8 <= e for s, e in l2_pages) if dt.indirect
                              else dt.valid and dt.base <= gpa and gpa + 8 <= dt.base + dt.size):
                continue                                  # a device table entry
            if tables[1].valid and tables[1].base <= gpa and gpa + size <= tables[1].base + tables[1].size:
                continue                                  # the packed collection table
            if any(s <= gpa and gpa + size <= e for s, e in itt_spans) and size == 8:
                continue
            raise AssertionError(f"{what} wrote [{gpa:#x}, {gpa + size:#x}): not in the ITS's tables")

    def msi(self, devid: int, eventid: int, size: int | None) -> None:
        """signal_msi (size None) or a GITS_TRANSLATER write of `size` bytes; the delivery must
        be what the mapping dump says (IHI 0069 5.2.1: translate, then make the LPI pending)."""
        its, sink = self.its, self.sink
        if size is not None:
            eid = eventid & (0xFFFF_FFFF if size == 4 else 0xFFFF)
            want = self.expected_translation(devid, eid) if size in (2, 4) else None
        else:
            want = self.expected_translation(devid, eventid)
        msis, misses, ncalls = its.msis, list(its.miss_counts), len(sink.calls)
        if size is None:
            self.mem.log.clear()
            try:
                delivered = its.signal_msi(devid, eventid)
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001 - invariant 1: nothing escapes an MSI
                raise AssertionError(f"signal_msi({devid:#x}, {eventid:#x}): {type(exc).__name__}"
                                     f" escaped the ITS model: {exc}") from exc
            if self.mem.log:
                raise AssertionError("signal_msi touched guest memory")
        else:
            self.guest("write", R.GITS_TRANSLATER, size, eventid, devid)
            if want is None:
                if its.msis != msis or len(sink.calls) != ncalls:
                    raise AssertionError(f"a {size}-byte GITS_TRANSLATER write was an MSI")
                return
            delivered = its.msis == msis + 1 and len(sink.calls) > ncalls
        if its.msis != msis + 1:
            raise AssertionError("an MSI was not counted")
        calls = sink.calls[ncalls:]
        if want[3] == 0:
            if not delivered or calls != [("set_pending", want[0], want[2])]:
                raise AssertionError(f"MSI ({devid:#x}, {eventid:#x}) should make LPI {want[0]} "
                                     f"pending on vCPU {want[2]}: delivered={delivered}, {calls}")
        else:
            misses[want[3]] += 1
            if delivered or calls or its.miss_counts != misses:
                raise AssertionError(f"MSI ({devid:#x}, {eventid:#x}) should miss (reason "
                                     f"{want[3]}): delivered={delivered}, {calls}")

    def expected_translation(self, devid: int, eventid: int) -> tuple:
        """(intid, icid, target, reason) from dump(), orphaned_ites() and GITS_CTLR."""
        its = self.its
        if not its.enabled:
            return (-1, -1, -1, MISS_ITS_DISABLED)
        dump = its.dump()
        dev = dump["devices"].get(devid)
        if dev is None:
            return (-1, -1, -1, MISS_DEVICE_UNMAPPED)
        ite = dev["events"].get(eventid)
        if ite is None:
            return (-1, -1, -1, MISS_EVENT_OUT_OF_RANGE if eventid >> dev["size_bits"]
                    else MISS_NO_ITE)
        target = dump["collections"].get(ite["icid"])
        if target is None or (devid, eventid) in its.orphaned_ites():
            return (-1, -1, -1, MISS_COLLECTION_UNMAPPED)
        return (ite["intid"], ite["icid"], target, 0)

    # ==========================================================================================
    # whole-state invariants
    # ==========================================================================================
    def check_consistency(self) -> None:
        its, cfg = self.its, self.config
        lpis = Counter(intid for intid, _ in its.ite_lpis())
        if dict(lpis) != self.sink.refs:
            raise AssertionError(f"the sink's mapped/unmapped count per LPI {self.sink.refs} is "
                                 f"not the model's ITEs {dict(lpis)}")
        if sum(lpis.values()) != its.ite_count:
            raise AssertionError(f"ite_count {its.ite_count}, {sum(lpis.values())} ITEs")
        # the model's own index (read only): ICID -> its ITEs
        index: dict = {}
        for devid, dev in its._devices.items():
            if devid >> cfg.devbits or devid < 0:
                raise AssertionError(f"DeviceID {devid:#x} is held, GITS_TYPER.Devbits allows "
                                     f"{cfg.devbits} bits")
            if not 1 <= dev.size_bits <= cfg.idbits:
                raise AssertionError(f"device {devid:#x} has {dev.size_bits} EventID bits, "
                                     f"GITS_TYPER.ID_bits allows {cfg.idbits}")
            for eventid, (_, icid) in dev.events.items():
                if eventid >> dev.size_bits:
                    raise AssertionError(f"device {devid:#x} event {eventid:#x} is beyond its "
                                         f"{dev.size_bits} EventID bits")
                index.setdefault(icid, set()).add((devid, eventid))
        if index != its._by_icid:
            raise AssertionError("the ICID index does not match the ITEs")
        for icid, target in its._collections.items():
            if not 0 <= icid <= 0xFFFF or not 0 <= target < self.nr_vcpus:
                raise AssertionError(f"collection {icid:#x} -> {target}: not a 16-bit ICID on a vCPU")

    def state_round_trip(self, swap: bool) -> None:
        """save_state -> JSON -> load_state into a fresh model: the same state and dump."""
        its = self.its
        state = its.save_state()
        text = json.dumps(state)
        twin, sink, records = self._new_model(self.mem)
        self.host_call("load_state of save_state()", lambda: twin.load_state(json.loads(text)))
        again = twin.save_state()
        if again.pop("generation") < state["generation"]:
            raise AssertionError("load_state made the generation go back")
        mine = dict(state)
        mine.pop("generation")
        if again != mine:
            raise AssertionError(f"save_state -> load_state -> save_state differs:\n{mine}\n{again}")
        if (twin.dump() != its.dump() or twin.orphaned_ites() != its.orphaned_ites()
                or twin.unmapped_collections() != its.unmapped_collections()):
            raise AssertionError("save_state -> load_state: the dump differs")
        if dict(Counter(i for i, _ in twin.ite_lpis())) != sink.refs:
            raise AssertionError("load_state did not tell the sink every ITE once")
        if swap:
            self.its, self.sink, self.records = twin, sink, records

    def _clean_tables(self, its: ItsModel, mem: FuzzMemory):
        """The regions a tables round trip of `its` uses, and a bound on the entries the
        restore walks, when its tables are laid out cleanly (both Valid, in RAM, nothing
        overlapping, every ICID inside the collection table); else None. Only then must the
        restore read back what the save wrote (otherwise the kernel's own round trip fails or
        mixes entries up too)."""
        dt = R.decode_baser(its.mmio_read(R.GITS_BASER0, 8))
        ct = R.decode_baser(its.mmio_read(R.GITS_BASER0 + 8, 8))
        if not dt.valid or not ct.valid or ct.indirect:
            return None
        dump = its.dump(include_orphans=False)
        colls = dump["collections"]
        unmapped = set(its.unmapped_collections())
        for dev in dump["devices"].values():
            unmapped.update(e["icid"] for e in dev["events"].values())
        unmapped -= set(colls)
        cap = ct.size // 8
        n = len(colls) + len(unmapped)
        if n > cap or any(i >= cap for i in (*colls, *unmapped)):
            return None
        zeroed = [(ct.base, ct.base + 8 * min(n + 1, cap))]
        kept = []                       # read, not written: the level-1 table
        entries = min(n + 1, cap)
        devids = sorted(dump["devices"])
        if not dt.indirect:
            last = devids[-1] + 1 if devids else dt.size // 8
            if 8 * last > dt.size:
                return None
            zeroed.append((dt.base, dt.base + 8 * last))
            entries += last
            if entries > ROUND_TRIP_ENTRIES:
                return None
        else:
            per_page = dt.page_size // 8
            last = devids[-1] // per_page + 1 if devids else dt.size // 8
            if 8 * last > dt.size:
                return None
            kept.append((dt.base, dt.base + 8 * last))
            entries += last
            if entries > ROUND_TRIP_ENTRIES:
                return None
            for index in range(last):
                l1 = mem.peek_u64(dt.base + 8 * index)
                if l1 is None:
                    return None
                if l1 >> 63:
                    page = l1 & _ADDR52 & ~(dt.page_size - 1)
                    zeroed.append((page, page + dt.page_size))
                    entries += per_page
            for devid in devids:
                l1 = mem.peek_u64(dt.base + 8 * (devid // per_page))
                if not l1 >> 63:
                    return None
        orphans = set(its.orphaned_ites())
        for devid, dev in its.dump()["devices"].items():
            # the walk steps over zero entries one by one: after an orphan (saved as zero, IHI
            # 0069 leaves the ITT's format to the ITS) it goes on to the ITT's end
            top = max(dev["events"], default=None)
            span = (1 << dev["size_bits"] if top is None or (devid, top) in orphans
                    else top + 1)
            zeroed.append((dev["itt_addr"], dev["itt_addr"] + 8 * span))
            entries += span
            if entries > ROUND_TRIP_ENTRIES:
                return None
        if entries > ROUND_TRIP_ENTRIES:
            return None
        regions = sorted(zeroed + kept)
        if any(not mem.inside(s, e - s) for s, e in regions):
            return None
        if any(a[1] > b[0] for a, b in zip(regions, regions[1:])):
            return None
        return zeroed, entries

    def tables_round_trip(self) -> None:
        """save_tables into clean tables -> restore_tables into a fresh model: the same
        mappings (what KVM_DEV_ARM_ITS_SAVE_TABLES / RESTORE_TABLES promise a migration)."""
        its = self.its
        copy = self.mem.copy()
        clean = self._clean_tables(its, copy)
        if clean is None:
            return
        zeroed, entries = clean
        for start, end in zeroed:
            copy.zero(start, end)
        state = its.save_state()
        saver, _, _ = self._new_model(copy)
        self.host_call("load_state", lambda: saver.load_state(state))
        if self.host_call("save_tables", saver.save_tables, allowed=abi.ItsTableError):
            return              # a device's entry is not there (level-1 entry, table end)
        empty = dict(state, devices={}, collections={}, placeholders=[])
        reader, sink, _ = self._new_model(copy)
        self.host_call("load_state", lambda: reader.load_state(empty))
        copy.log.clear()
        self.host_call("restore_tables of clean saved tables",
                       lambda: reader.restore_tables(max_entries=entries + 16))
        want, got = its.dump(include_orphans=False), reader.dump()
        if got != want:
            raise AssertionError(f"save_tables -> restore_tables differs:\n{want}\n{got}")
        if not set(its.unmapped_collections()) <= set(reader.unmapped_collections()):
            raise AssertionError("restore_tables lost a collection without a target")
        self.table_checks += 1


def run_one(data: bytes) -> None:
    """Run one input; AssertionError when an invariant (module docstring) breaks."""
    _Session(Decoder(data)).run()


def seeded_inputs(seed: int, n: int):
    """`n` deterministic pseudo-random inputs (the CI slice): mostly starting from a driver's
    set-up, of 16..600 bytes."""
    rng = random.Random(seed)
    for _ in range(n):
        # the header decode_config and _Session read: base configuration, override flag (and
        # with it ten bytes of overrides), vCPUs, LPI bound, flags (bit 1: a driver's set-up)
        over = rng.random() < 0.5
        head = [rng.randrange(256), rng.randrange(128) * 2 + over]
        if over:
            head += rng.randbytes(10)
        head += [rng.randrange(256), rng.randrange(256),
                 rng.randrange(256) | (2 if rng.random() < 0.8 else 0)]
        yield bytes(head) + rng.randbytes(rng.randint(16, 600))

